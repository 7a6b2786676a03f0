"""The bottom layer: errors and exit codes, logging, the run-directory layout, run tags, the plugin
registries, and the table and chart primitives. Imports nothing else of lora_exp and no ML library."""
