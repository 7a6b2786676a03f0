"""MLflow tracking: ``server`` (where the tracking server is and whether it answers: light, what the reports
and the CLI import), ``spool`` (what a job logs, spooled to disk and carried by a background thread),
``runs`` (one MLflow run per job, reattached by every attempt) and ``sysmetrics`` (system metrics)."""
