"""virtio-net: one host tap served over vhost-user by a process of its own."""
