/* What vmm_vcpu_run() reports about one KVM exit: the union member of struct kvm_run
 * that applies, flattened, so Python never needs kvm_run's layout. Read by the C
 * source and, as text, by the cffi declarations (native/kvm_build.py). */
struct vmm_exit {
    uint32_t reason;
    uint8_t  io_in;        /* KVM_EXIT_IO: 1 for IN, 0 for OUT */
    uint8_t  size;         /* IO access size, or MMIO length */
    uint16_t port;
    uint32_t count;        /* IO repeat count (string instructions) */
    uint8_t  mmio_write;
    uint64_t addr;         /* MMIO guest physical address */
    uint8_t *data;         /* IO: count*size bytes in the run page; MMIO: 8 bytes */
    uint64_t detail;       /* hardware reason, entry failure, internal suberror, event type */
};
