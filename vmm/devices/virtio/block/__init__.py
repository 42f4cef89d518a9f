"""virtio-blk: one disk image served over vhost-user by a process of its own."""
