"""The Ray driver: job specs, planning, launching searches and evaluations, MLflow records, tables."""
