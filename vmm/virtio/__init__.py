"""Device-side virtio: the split-virtqueue walker the vhost-user backends share."""
