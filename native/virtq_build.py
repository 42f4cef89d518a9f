"""cffi build script for vmm._virtq: the split-virtqueue walker of native/virtq.c and
the virtio-blk and virtio-net data paths of native/blkio.c and native/netio.c, which
run on it.

API mode, so the struct layouts and the VQ_* / BLK_* constants come from the headers
through the compiler (`...`) instead of being retyped here. vmm/virtio/queue.py,
vmm/devices/virtio/block/request.py and vmm/devices/virtio/net/rxtx.py are the only
users.
"""

import os
import shlex
import subprocess
import sysconfig
import tempfile

from cffi import FFI

ffibuilder = FFI()


def have_liburing() -> bool:
    """Whether liburing's header and library are there (Debian: liburing-dev, which
    scripts/setup.sh installs). Without them the disk backends fall back to Linux AIO,
    which needs nothing but the kernel."""
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "probe.c")
        with open(source, "w") as f:
            f.write("#include <liburing.h>\nint main(void) { struct io_uring r; "
                    "return io_uring_queue_init(1, &r, 0) && 0; }\n")
        try:
            return subprocess.run(compiler + [source, "-o", os.path.join(scratch, "probe"),
                                              "-luring"],
                                  capture_output=True).returncode == 0
        except OSError:
            return False


LIBURING = have_liburing()

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
struct vq { uint32_t num; int broken; int event_idx; ...; };

int vq_mem_init(struct vq_mem *mem, const struct vq_region *regions, int nregions);
uint8_t *vq_translate(const struct vq_mem *mem, uint64_t gpa, uint64_t len);
int vq_setup(struct vq *q, const struct vq_region *regions, int nregions, uint32_t num,
             uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
             uint16_t last_avail_idx);
int vq_pop(struct vq *q, struct vq_chain *chain);
void vq_push(struct vq *q, uint16_t head, uint32_t written);
void vq_add_used(struct vq *q, uint16_t head, uint32_t written);
void vq_publish_used(struct vq *q);
void vq_add_used_late(struct vq *q, uint16_t head, uint32_t written);
int vq_needs_interrupt(struct vq *q);
void vq_set_notify(struct vq *q, int enable);
void vq_set_event_idx(struct vq *q, int enable);
int vq_pending(struct vq *q);
uint16_t vq_get_last_avail_idx(const struct vq *q);
void vq_set_last_avail_idx(struct vq *q, uint16_t idx);

#define VQ_INFLIGHT_VERSION ...
#define VQ_INFLIGHT_MAX_QUEUE ...
uint64_t vq_inflight_queue_bytes(uint32_t queue_size);
int vq_inflight_start(struct vq *q, uint8_t *region, uint32_t queue_size);

struct rl_params { uint64_t size; uint64_t one_time_burst; uint64_t refill_ns; };
struct rl_config { uint64_t sequence; struct rl_params ops, bytes; ...; };
struct rl_limiter { ...; };
#define RL_MAX_REFILL_NS ...
int rl_init(struct rl_limiter *l, const volatile struct rl_config *config);
void rl_configure(volatile struct rl_config *config, const struct rl_params *ops,
                  const struct rl_params *bytes);
uint64_t rl_consume(struct rl_limiter *l, uint64_t bytes, uint64_t now);

#define BLK_SECTOR ...
#define BLK_ID_BYTES ...
#define BLK_MAX_DWZ_SEG ...
#define BLK_T_IN ...
#define BLK_T_OUT ...
#define BLK_T_FLUSH ...
#define BLK_T_GET_ID ...
#define BLK_T_DISCARD ...
#define BLK_T_WRITE_ZEROES ...
#define BLK_S_OK ...
#define BLK_S_IOERR ...
#define BLK_S_UNSUPP ...
#define BLK_DWZ_F_UNMAP ...
#define BLK_NOTIFY ...
#define BLK_MORE ...
#define BLK_FULL ...
#define BLK_RETRY ...
#define BLK_THROTTLED ...
#define BLK_ENGINE_INLINE ...
#define BLK_ENGINE_IO_URING ...
#define BLK_ENGINE_AIO ...
#define BLK_DEPTH ...
#define BLK_SLOT_IOVS ...
#define BLK_OP_READ ...
#define BLK_OP_WRITE ...
#define BLK_OP_FLUSH ...
#define BLK_OP_OTHER ...
#define BLK_LAT_BUCKETS ...
#define BLK_STATS_BYTES ...
struct blk_stats {
    uint64_t ops[4];
    uint64_t failed[4];
    uint64_t bytes[2];
    uint64_t total_ns[3];
    uint64_t throttled;
    uint64_t latency[2][16];
};

struct blk_disk {
    int fd;
    uint64_t capacity;
    uint32_t read_only;
    uint32_t direct;
    uint32_t block_device;
    uint32_t mem_align;
    uint32_t block_size;
    uint32_t discard;
    uint32_t write_zeroes;
    uint32_t write_zeroes_may_unmap;
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    uint8_t id[...];
    struct rl_limiter *limiter;
};
struct blk_engine {
    int kind;
    int fd;
    uint32_t depth;
    uint32_t queued;
    uint32_t inflight;
    int error;
    uint64_t started, completed, short_transfers, refused;
    ...;
};
struct blk_worker {
    struct blk_engine *engine;
    uint32_t no_punch_hole, no_zero_range;
    uint64_t requests, errors, bounced, zeroes_written;
    uint32_t held;
    uint64_t wait_ns;
    struct blk_stats *stats;
    ...;
};

int blk_dio_alignment(int fd, uint32_t *mem_align, uint32_t *block_size);
int blk_worker_init(struct blk_worker *w, const struct blk_disk *d, uint8_t *bounce,
                    size_t bounce_size);
int blk_process(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                uint32_t budget);
int blk_serve(struct vq *q, const struct blk_disk *d, struct blk_worker *w, int kick_fd,
              int call_fd, int stop_fd);
int blk_pump(struct vq *q, const struct blk_disk *d, struct blk_worker *w, uint32_t budget);
int blk_drain(struct vq *q, const struct blk_disk *d, struct blk_worker *w);
int blk_engine_init(struct blk_engine *e, const struct blk_disk *d, int kind, uint32_t depth);
void blk_engine_close(struct blk_engine *e);
int blk_have_io_uring(void);

#define NET_HDR_LEN ...
#define NET_LEGACY_HDR_LEN ...
#define NET_FRAME_MAX ...
#define NET_RX_BUF ...
#define NET_NOTIFY ...
#define NET_MORE ...
#define NET_STARVED ...
#define NET_THROTTLED ...

struct net_stats { uint64_t frames, bytes, dropped, bad_chains, throttled; };
struct net_rx {
    uint8_t *buf;
    uint32_t pending;
    uint32_t hdr_len;
    uint32_t mergeable;
    uint32_t guest_csum;
    struct net_stats *stats;
    int last_errno;
    uint32_t starved;
    struct rl_limiter *limiter;
    uint32_t charged;
    uint64_t wait_ns;
    ...;
};
struct net_tx {
    uint32_t hdr_len;
    struct net_stats *stats;
    int last_errno;
    struct rl_limiter *limiter;
    uint32_t held;
    uint64_t wait_ns;
    ...;
};

int net_rx_process(struct vq *q, int tap, struct net_rx *rx, uint32_t budget);
int net_tx_process(struct vq *q, int tap, struct net_tx *tx, uint32_t budget);
#define NET_BUDGET ...
int net_rx_serve(struct vq *q, int tap, struct net_rx *rx, int kick_fd, int call_fd,
                 int stop_fd);
int net_tx_serve(struct vq *q, int tap, struct net_tx *tx, int kick_fd, int call_fd,
                 int stop_fd);

/* The tap's ioctls and flags (vmm/devices/virtio/net/tap.py). */
#define TUNSETIFF ...
#define TUNGETIFF ...
#define TUNSETOFFLOAD ...
#define TUNSETVNETHDRSZ ...
#define TUNGETVNETHDRSZ ...
#define TUNGETFEATURES ...
#define IFF_TAP ...
#define IFF_NO_PI ...
#define IFF_VNET_HDR ...
#define IFF_PERSIST ...
#define IFF_MULTI_QUEUE ...
#define TUN_F_CSUM ...
#define TUN_F_TSO4 ...
#define TUN_F_TSO6 ...
#define TUN_F_TSO_ECN ...
#define TUN_F_UFO ...
#define IFNAMSIZ ...
""")

ffibuilder.set_source("vmm._virtq",
                      '#include "virtq.h"\n#include "ratelimit.h"\n#include "blkio.h"\n#include "netio.h"',
                      sources=["native/virtq.c", "native/ratelimit.c", "native/blkio.c",
                               "native/netio.c"], include_dirs=["native"],
                      libraries=["uring"] if LIBURING else [],
                      define_macros=[] if LIBURING else [("BLK_NO_IO_URING", "1")],
                      extra_compile_args=["-std=c99", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
