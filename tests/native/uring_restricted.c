/* What a disk backend's io_uring allows once native/blkio.c has set it up
 * (blk_engine_init): READV, WRITEV and FSYNC on the registered disk (fixed file 0) and
 * nothing else, and no io_uring_register call at all. io_uring operations are not seen
 * by seccomp, so these rules are what stands between a backend taken over by a guest
 * and every other io_uring opcode (open, connect, ...). Run by
 * tests/unit/test_vhost_user_blk_engine.py; exit status 0 when every rule holds. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "blkio.h"

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "uring_restricted: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    exit(1); } } while (0)

static struct blk_engine e;

/* Submits one SQE as prepared by `prep` and returns its CQE's result. */
static int one(void (*prep)(struct io_uring_sqe *, void *), void *arg)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&e.ring);
    struct io_uring_cqe *cqe;
    int res;

    CHECK(sqe != NULL);
    prep(sqe, arg);
    sqe->user_data = 0x1234;
    CHECK(io_uring_submit(&e.ring) == 1);
    CHECK(io_uring_wait_cqe(&e.ring, &cqe) == 0);
    CHECK(cqe->user_data == 0x1234);
    res = cqe->res;
    io_uring_cqe_seen(&e.ring, cqe);
    return res;
}

static char buf[4096] __attribute__((aligned(4096)));
static struct iovec iov = { buf, sizeof buf };
static int disk_fd;

static void readv_fixed0(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_readv(s, 0, &iov, 1, 0); s->flags |= IOSQE_FIXED_FILE; }
static void writev_fixed0(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_writev(s, 0, &iov, 1, 4096); s->flags |= IOSQE_FIXED_FILE; }
static void fsync_fixed0(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_fsync(s, 0, IORING_FSYNC_DATASYNC); s->flags |= IOSQE_FIXED_FILE; }
static void readv_fixed1(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_readv(s, 1, &iov, 1, 0); s->flags |= IOSQE_FIXED_FILE; }
static void readv_plain_fd(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_readv(s, disk_fd, &iov, 1, 0); }
static void read_fixed0(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_read(s, 0, buf, sizeof buf, 0); s->flags |= IOSQE_FIXED_FILE; }
static void nop(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_nop(s); s->flags |= IOSQE_FIXED_FILE; }
static void openat_(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_openat(s, AT_FDCWD, "/etc/passwd", O_RDONLY, 0); s->flags |= IOSQE_FIXED_FILE; }
static void readv_linked(struct io_uring_sqe *s, void *a) { (void)a; io_uring_prep_readv(s, 0, &iov, 1, 0); s->flags |= IOSQE_FIXED_FILE | IOSQE_ASYNC; }

static int reg(unsigned op, const void *arg, unsigned n)
{
    long rc = syscall(__NR_io_uring_register, e.ring.ring_fd, op, arg, n);
    return rc < 0 ? -errno : (int)rc;
}

int main(void)
{
    char path[] = "/tmp/uring_restricted.XXXXXX";
    struct blk_disk d;
    int other;

    disk_fd = mkstemp(path);
    CHECK(disk_fd >= 0);
    unlink(path);
    memset(buf, 0x5A, sizeof buf);
    CHECK(pwrite(disk_fd, buf, sizeof buf, 0) == (ssize_t)sizeof buf);
    CHECK(ftruncate(disk_fd, 65536) == 0);
    memset(&d, 0, sizeof d);
    d.fd = disk_fd;
    CHECK(blk_engine_init(&e, &d, BLK_ENGINE_IO_URING, 8) == 0);
    CHECK(e.kind == BLK_ENGINE_IO_URING && e.fd == e.ring.ring_fd);

    /* Allowed: the three opcodes on fixed file 0. */
    memset(buf, 0, sizeof buf);
    CHECK(one(readv_fixed0, NULL) == 4096 && buf[0] == 0x5A && buf[4095] == 0x5A);
    CHECK(one(writev_fixed0, NULL) == 4096);
    CHECK(one(fsync_fixed0, NULL) == 0);
    /* Refused: another fixed index (there is none), the disk by its plain fd, another
     * opcode even on the fixed file, any other SQE flag. */
    CHECK(one(readv_fixed1, NULL) == -EBADF);
    CHECK(one(readv_plain_fd, NULL) == -EACCES);
    CHECK(one(read_fixed0, NULL) == -EACCES);
    CHECK(one(nop, NULL) == -EACCES);
    CHECK(one(openat_, NULL) == -EACCES);
    CHECK(one(readv_linked, NULL) == -EACCES);
    /* No io_uring_register opcode at all: files, buffers, eventfds, restrictions. */
    other = open("/dev/null", O_RDONLY | O_CLOEXEC);
    CHECK(other >= 0);
    CHECK(reg(IORING_UNREGISTER_FILES, NULL, 0) == -EACCES);
    CHECK(reg(IORING_REGISTER_FILES, &other, 1) == -EACCES);
    CHECK(reg(IORING_REGISTER_FILES_UPDATE, NULL, 0) == -EACCES);
    CHECK(reg(IORING_REGISTER_BUFFERS, &iov, 1) == -EACCES);
    CHECK(reg(IORING_REGISTER_EVENTFD, &other, 1) == -EACCES);
    CHECK(reg(IORING_REGISTER_RESTRICTIONS, NULL, 0) == -EACCES);
    CHECK(reg(IORING_REGISTER_ENABLE_RINGS, NULL, 0) == -EACCES);
    blk_engine_close(&e);
    close(other);
    close(disk_fd);
    printf("uring_restricted: every rule holds\n");
    return 0;
}
