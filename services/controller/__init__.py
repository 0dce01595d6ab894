"""The AutoNPO controller service: Prometheus-driven AutoNPO, manual interventions, REST API, durable records."""
