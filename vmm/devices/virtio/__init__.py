"""Virtio devices, one folder each: the device model a backend process serves."""
