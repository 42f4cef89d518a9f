/* vsock-io: a guest's AF_VSOCK stream tool for tests and benchmarks (busybox has none).
 * Built static into the test initramfs by scripts/guest-assets.sh.
 *
 *   vsock-io connect CID PORT       connect; stdin -> stream, stream -> stdout
 *   vsock-io listen PORT            accept one connection; the same bridging
 *   vsock-io sink PORT              accept one; read to end of stream; answer
 *                                   "<bytes>\n" and close (throughput, host -> guest)
 *   vsock-io source CID PORT BYTES  connect; send BYTES zero bytes; half-close; copy
 *                                   what comes back to stdout (throughput, guest -> host)
 *
 * Bridging ends when both directions have ended: stdin's end half-closes the stream
 * (the peer reads its end), the stream's end is stdout's. Exit status 0, or 1 with a
 * line on stderr.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
    fprintf(stderr, "vsock-io: %s: %s\n", what, strerror(errno));
    return 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int stream_connect(unsigned cid, unsigned port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    /* Linux gives a connect 2 s by default; a backend in a nested test rig runs under
     * an emulator and may need longer to answer. */
    struct timeval timeout = {.tv_sec = 20};
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &timeout, sizeof timeout);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return -1;
    return s;
}

static int stream_accept(unsigned port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                               .svm_port = port};
    int l = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(l, 1) < 0)
        return -1;
    int s = accept(l, NULL, NULL);
    close(l);
    return s;
}

static int bridge(int s)
{
    static char buf[65536];
    int in_open = 1, sock_open = 1;
    while (in_open || sock_open) {
        struct pollfd fds[2] = {{.fd = in_open ? 0 : -1, .events = POLLIN},
                                {.fd = sock_open ? s : -1, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return fail("poll");
        }
        if (fds[0].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n < 0)
                return fail("read stdin");
            if (n == 0) {
                in_open = 0;
                shutdown(s, SHUT_WR);
            } else if (write_all(s, buf, (size_t)n) < 0) {
                return fail("write stream");
            }
        }
        if (fds[1].revents) {
            ssize_t n = read(s, buf, sizeof buf);
            if (n < 0)
                return fail("read stream");
            if (n == 0)
                sock_open = 0;
            else if (write_all(1, buf, (size_t)n) < 0)
                return fail("write stdout");
        }
    }
    return 0;
}

static int sink(int s)
{
    static char buf[65536];
    unsigned long long total = 0;
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n < 0)
            return fail("read stream");
        if (n == 0)
            break;
        total += (unsigned long long)n;
    }
    char line[32];
    int len = snprintf(line, sizeof line, "%llu\n", total);
    if (write_all(s, line, (size_t)len) < 0)
        return fail("write stream");
    return 0;
}

static int source(int s, unsigned long long bytes)
{
    static char buf[65536];
    while (bytes) {
        size_t len = bytes < sizeof buf ? (size_t)bytes : sizeof buf;
        if (write_all(s, buf, len) < 0)
            return fail("write stream");
        bytes -= len;
    }
    shutdown(s, SHUT_WR);
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n < 0)
            return fail("read stream");
        if (n == 0)
            return 0;
        if (write_all(1, buf, (size_t)n) < 0)
            return fail("write stdout");
    }
}

int main(int argc, char **argv)
{
    int s;
    if (argc == 4 && !strcmp(argv[1], "connect")) {
        if ((s = stream_connect(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0))) < 0)
            return fail("connect");
        return bridge(s);
    }
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        if ((s = stream_accept(strtoul(argv[2], NULL, 0))) < 0)
            return fail("listen");
        return bridge(s);
    }
    if (argc == 3 && !strcmp(argv[1], "sink")) {
        if ((s = stream_accept(strtoul(argv[2], NULL, 0))) < 0)
            return fail("listen");
        return sink(s);
    }
    if (argc == 5 && !strcmp(argv[1], "source")) {
        if ((s = stream_connect(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0))) < 0)
            return fail("connect");
        return source(s, strtoull(argv[4], NULL, 0));
    }
    fprintf(stderr, "usage: vsock-io connect CID PORT | listen PORT | sink PORT | "
                    "source CID PORT BYTES\n");
    return 2;
}
