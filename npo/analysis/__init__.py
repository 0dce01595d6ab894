"""Run analysis and reporting, over the folders npo.runtime writes:

- runs: load a run folder (main line, superseded rows, evaluations with the compute spent) and its summary numbers
- stats: evidence statistics of an experiment grid (compute units, time to target, paired differences, S table,
  targets)
- results: the results page of an experiment grid (docs/results.md) and its figures
- report: a run's report.md and the comparison of runs
- qvs: the Q / V / S analysis of a run's checkpoints and of guide sources
- plots: every plot (matplotlib, loaded on first use)
- markdown: table cells and markdown tables
"""
