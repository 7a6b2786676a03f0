"""Planning a run before it starts: its model's architecture from config.json alone (``architectures``) and
its peak memory, estimated on the meta device (``memplan``, behind ``lora-exp plan``)."""
