"""virtio-vsock in userspace: guest AF_VSOCK streams bridged to host unix sockets
(Firecracker's hybrid convention), served over vhost-user by a process of its own."""
