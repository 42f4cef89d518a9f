"""The virtual machine proper: guest memory, KVM objects, vCPUs and the I/O bus."""
