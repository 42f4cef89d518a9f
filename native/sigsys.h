/* The SIGSYS reporter (native/sigsys.c); read by the C source and, as text, by the
 * cffi declarations (native/sigsys_build.py). */
#include <stddef.h>

/* Install the handler; violations are written to fd, naming role unless the thread
 * has its own (sigsys_set_thread_role). Returns 0, or -1 with errno. */
int sigsys_arm(int fd, const char *role);
/* The role of the calling thread (a vCPU, the QMP thread), copied. */
void sigsys_set_thread_role(const char *role);
/* "read", "ioctl", ... for x86_64 syscall numbers; "?" for unknown ones. */
const char *sigsys_syscall_name(long nr);
/* The violation line (with its newline) into buf; its length. */
size_t sigsys_format(char *buf, size_t cap, const char *role, long nr);
