"""What every job runs on: data loading and checks, tokenizers and models, artifacts, the Trainer set-up,
MLflow tracking, and the one training path (``fit``). Imports the layers below (methods, formulations,
tasks, config, core); pipelines compose it."""
