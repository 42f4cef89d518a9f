"""virtio-rng: entropy for the guest from a host character device (docs/configuration.md)."""
