/*
 * stratovirt-standin: what a `stratovirt` process becomes once a zygote has forked its
 * launcher (vmm/zygote/). It execs this so that a VM's stand-in costs a C program's
 * few hundred KiB rather than an interpreter's 4 MiB, per VM.
 *
 *     STRATOVIRT_STANDIN=FD:PID:NAME stratovirt-standin ARGS...   (vmm/zygote/client.py)
 *
 * ARGS and NAME are the command line and name of the `stratovirt` it replaces (so ps
 * shows the VM as before), FD its connection to the zygote, PID the launcher's. It forwards SIGTERM, SIGINT,
 * SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the launcher (through a pidfd: never to a
 * reused pid), waits for the one message the zygote sends when the launcher has ended
 * (its exit status as a marshal int: vmm/zygote/wire.py) and exits with that status, or
 * dies of the same signal. Its own name and argv are the `stratovirt` it replaced.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
static int launcher = -1;

static void forward(int number)
{
    int saved = errno;
    syscall(SYS_pidfd_send_signal, launcher, number, NULL, 0);
    errno = saved;
}

/* marshal's TYPE_INT: 'i' (with or without FLAG_REF, 0x80), then 4 bytes little-endian. */
static int status_of(const unsigned char *message, ssize_t length, int *status)
{
    if (length != 5 || (message[0] & 0x7f) != 'i')
        return -1;
    *status = (int32_t)((uint32_t)message[1] | (uint32_t)message[2] << 8 |
                        (uint32_t)message[3] << 16 | (uint32_t)message[4] << 24);
    return 0;
}

int main(int argc, char **argv)
{
    const char *given = getenv("STRATOVIRT_STANDIN");
    int connection, pid, name = 0;
    (void)argc, (void)argv;
    if (!given || sscanf(given, "%d:%d:%n", &connection, &pid, &name) != 2 || !name) {
        fprintf(stderr, "stratovirt-standin: run by stratovirt only\n");
        return 2;
    }
    launcher = syscall(SYS_pidfd_open, pid, 0);
    prctl(PR_SET_NAME, given + name, 0, 0, 0);
    /* launcher < 0: it has ended already; the zygote's message says how. */
    struct sigaction action = {.sa_handler = forward};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        if (launcher >= 0)
            sigaction(forwarded[i], &action, NULL);

    unsigned char message[64];
    ssize_t length;
    do {
        length = recv(connection, message, sizeof message, 0);
    } while (length < 0 && errno == EINTR);
    int status;
    if (length <= 0 || status_of(message, length, &status) < 0) {
        fprintf(stderr, "stratovirt: error: the zygote ended before the VM; its exit "
                        "status is lost\n");
        return 1;
    }
    if (status < 0) {       /* the launcher died of a signal: so does its stand-in */
        signal(-status, SIG_DFL);
        sigset_t only;
        sigemptyset(&only);
        sigaddset(&only, -status);
        sigprocmask(SIG_UNBLOCK, &only, NULL);
        raise(-status);
        return 128 - status;
    }
    return status;
}
