/* The SIGSYS reporter: what happens when a seccomp filter traps a syscall.
 *
 * Every profile's default action is SCMP_ACT_TRAP, so a syscall outside the profile
 * raises SIGSYS in the thread that made it. The handler below writes one line,
 *     seccomp violation: role=<role> syscall=<nr> (<name>)\n
 * with a single write(2) to the log fd, restores SIG_DFL for SIGSYS and sends SIGSYS
 * to its own thread. SIGSYS is blocked while the handler runs, so the signal waits
 * until the handler returns; then the default action ends the whole process with
 * SIGSYS, and the parent sees a death by signal, not an exit status.
 *
 * Async-signal-safe: no malloc, no stdio, no locks. The role strings are copied into
 * static storage when the reporter is armed, the names come from a table compiled in
 * (sigsys_names.h, generated from <asm/unistd_64.h> by native/sigsys_build.py), and
 * the syscalls used here (write, rt_sigaction, getpid, gettid, tgkill, rt_sigreturn)
 * are allowed by every profile. Should one of them be trapped anyway, the kernel
 * resets a blocked SIGSYS to SIG_DFL before forcing it, so the process still dies
 * instead of looping.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sigsys.h"
#include "sigsys_names.h"

#define ROLE_MAX 32
#ifndef SYS_SECCOMP
#define SYS_SECCOMP 1      /* si_code of a seccomp trap (asm-generic/siginfo.h) */
#endif

static int log_fd = 2;
static char process_role[ROLE_MAX] = "unknown";
/* initial-exec: a plain %fs-relative load in the handler, never a lazy TLS allocation. */
static __thread char thread_role[ROLE_MAX] __attribute__((tls_model("initial-exec")));

static void copy_role(char *dst, const char *src)
{
    size_t n = strnlen(src, ROLE_MAX - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

const char *sigsys_syscall_name(long nr)
{
    if (nr < 0 || nr >= (long)(sizeof(syscall_names) / sizeof(syscall_names[0])) ||
        !syscall_names[nr])
        return "?";
    return syscall_names[nr];
}

static size_t append(char *buf, size_t at, size_t cap, const char *text)
{
    while (*text && at < cap)
        buf[at++] = *text++;
    return at;
}

static size_t append_number(char *buf, size_t at, size_t cap, long value)
{
    char digits[24];
    int n = 0;
    unsigned long v = value < 0 ? -(unsigned long)value : (unsigned long)value;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (value < 0 && at < cap)
        buf[at++] = '-';
    while (n && at < cap)
        buf[at++] = digits[--n];
    return at;
}

size_t sigsys_format(char *buf, size_t cap, const char *role, long nr)
{
    size_t at = 0;
    if (cap == 0)
        return 0;
    at = append(buf, at, cap - 1, "seccomp violation: role=");
    at = append(buf, at, cap - 1, role);
    at = append(buf, at, cap - 1, " syscall=");
    at = append_number(buf, at, cap - 1, nr);
    at = append(buf, at, cap - 1, " (");
    at = append(buf, at, cap - 1, sigsys_syscall_name(nr));
    at = append(buf, at, cap - 1, ")");
    buf[at++] = '\n';
    return at;
}

static void on_sigsys(int sig, siginfo_t *info, void *context)
{
    (void)context;
    if (info->si_code == SYS_SECCOMP) {
        char line[160];
        const char *role = thread_role[0] ? thread_role : process_role;
        size_t len = sigsys_format(line, sizeof(line), role, info->si_syscall);
        ssize_t ignored = write(log_fd, line, len);
        (void)ignored;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGSYS, &dfl, NULL);
    syscall(SYS_tgkill, (long)syscall(SYS_getpid), (long)syscall(SYS_gettid), sig);
}

int sigsys_arm(int fd, const char *role)
{
    struct sigaction action;
    log_fd = fd;
    copy_role(process_role, role);
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigsys;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSYS, &action, NULL);
}

void sigsys_set_thread_role(const char *role)
{
    copy_role(thread_role, role);
}

int sigsys_load_filter(const void *program, size_t length)
{
    struct sock_fprog prog;
    if (length == 0 || length % sizeof(struct sock_filter) != 0 ||
        length / sizeof(struct sock_filter) > BPF_MAXINSNS)
        return -EINVAL;
    prog.len = (unsigned short)(length / sizeof(struct sock_filter));
    prog.filter = (struct sock_filter *)program;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
        return -errno;
    return 0;
}

struct libseccomp_version {
    unsigned int major, minor, micro;
};

long sigsys_libseccomp_version(void)
{
    void *library = dlopen("libseccomp.so.2", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL)
        return -1;
    const struct libseccomp_version *(*version)(void) =
        (const struct libseccomp_version *(*)(void))dlsym(library, "seccomp_version");
    const struct libseccomp_version *v = version ? version() : NULL;
    long result = v ? (long)v->major * 1000000 + (long)v->minor * 1000 + v->micro : -1;
    /* Left loaded: pyseccomp loads the same library if a filter must be compiled. */
    return result;
}
