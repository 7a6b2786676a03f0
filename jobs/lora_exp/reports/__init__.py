"""The read side: which MLflow runs (``selection``), their metrics as tables (``runs``), statistics, arms,
charts, the comparison report (``compare``) and ``status``. Imports nothing of the training path."""
