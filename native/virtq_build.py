"""cffi build script for vmm._virtq: the split-virtqueue walker of native/virtq.c.

API mode, so the struct layouts and the VQ_* limits come from native/virtq.h through the
compiler (`...`) instead of being retyped here. vmm/virtio/queue.py is the only user.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef("""
#define VQ_MAX_REGIONS ...
#define VQ_MAX_QUEUE_SIZE ...
#define VQ_MAX_SEGS ...
#define VQ_MAX_INDIRECT ...

struct vq_region { uint64_t gpa, size; uint8_t *hva; };
struct vq_mem { ...; };
struct vq_seg { uint8_t *addr; uint32_t len; uint32_t is_write; };
struct vq_chain {
    uint16_t head;
    uint32_t nsegs;
    uint32_t nreadable;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    struct vq_seg segs[...];
};
struct vq { uint32_t num; int broken; ...; };

int vq_mem_init(struct vq_mem *mem, const struct vq_region *regions, int nregions);
uint8_t *vq_translate(const struct vq_mem *mem, uint64_t gpa, uint64_t len);
int vq_setup(struct vq *q, const struct vq_region *regions, int nregions, uint32_t num,
             uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
             uint16_t last_avail_idx);
int vq_pop(struct vq *q, struct vq_chain *chain);
void vq_push(struct vq *q, uint16_t head, uint32_t written);
int vq_needs_interrupt(struct vq *q);
uint16_t vq_get_last_avail_idx(const struct vq *q);
void vq_set_last_avail_idx(struct vq *q, uint16_t idx);
""")

ffibuilder.set_source("vmm._virtq", '#include "virtq.h"',
                      sources=["native/virtq.c"], include_dirs=["native"],
                      extra_compile_args=["-std=c99", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
