"""The jobs: train, eval, distill, export, generate. Each composes the runtime on its own; none imports
another (the CLI picks the pipeline)."""
