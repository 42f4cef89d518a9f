"""QMP on the api-channel: the JSON control protocol QEMU and StratoVirt speak."""
