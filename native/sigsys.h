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

/* Installing a role's filter once it is compiled (vmm/sandbox/seccomp.py caches the BPF
 * libseccomp makes of each profile): one seccomp(SECCOMP_SET_MODE_FILTER, 0) call that
 * loads `length` bytes of struct sock_filter into the calling thread alone (no TSYNC,
 * no flag: what libseccomp's seccomp_load passes for our filters). The thread must have
 * no_new_privs (or CAP_SYS_ADMIN). Returns 0, or -errno. */
int sigsys_load_filter(const void *program, size_t length);
/* The version of the libseccomp.so.2 the dynamic loader finds (the one pyseccomp
 * loads), as major * 1000000 + minor * 1000 + micro; -1 if there is none. */
long sigsys_libseccomp_version(void);
