"""Devices the guest sees: legacy PC devices in the vm process, virtio devices as backends."""
