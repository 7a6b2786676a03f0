"""What reads the runs back: selection of MLflow runs, the comparison report, status, and the pre-flight
sanity checks. The top layer under the CLI."""
