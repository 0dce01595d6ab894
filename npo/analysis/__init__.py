"""Run analysis and reporting: run loading, plots, reports, Q/V/S, evidence statistics."""
