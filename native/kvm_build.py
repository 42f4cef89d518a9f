"""cffi build script for vmm._kvm: KVM's ioctl numbers and structs from <linux/kvm.h>.

The constants come from the kernel header at build time, never retyped by hand.
ioctl is wrapped to take an unsigned long (Python's fcntl.ioctl passes a C int, which
overflows for addresses such as the TSS at 0xfffbd000) and to return -errno, so a
caller on any thread gets the error without a race on errno.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef("""
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...

long vmm_ioctl(int fd, unsigned long request, unsigned long arg);
long vmm_ioctl_ptr(int fd, unsigned long request, void *arg);
""")

ffibuilder.set_source("vmm._kvm", r"""
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static long vmm_ioctl(int fd, unsigned long request, unsigned long arg)
{
    long ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

static long vmm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    long ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}
""")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
