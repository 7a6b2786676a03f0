"""lora-exp: fine-tuning experiments on causal LMs as Kubernetes batch jobs, tracked in MLflow."""

__version__ = "0.1.0"
