"""vhost-user: the standard protocol between a virtio frontend (our vm process, or QEMU)
and an out-of-process device backend, over a unix socket with fds passed alongside."""
