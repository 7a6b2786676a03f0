"""``python -m lora_exp ...``: the same CLI, for torchrun and container entrypoints."""

from lora_exp.cli import main

raise SystemExit(main())
