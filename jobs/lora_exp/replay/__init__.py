"""The seed replays (``lora-exp replay``, ``make seeds``): every seed experiment run from its values file on
random-weight replicas of its models (``replicas``) and hub-format local data, each promised output checked
(``seeds``). A tool for this project, not part of a job."""
