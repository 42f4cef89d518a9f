"""virtio-console: hvc0 in the guest, a unix socket with one client on the host, served
over vhost-user by a process of its own."""
