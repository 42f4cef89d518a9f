"""cffi build script for vmm._kvm: the KVM API from <linux/kvm.h> (and the vhost API from
<linux/vhost.h>, for the kernel's vhost-vsock), and the vCPU run call.

Constants and struct layouts come from the kernel header at build time (`...` lets the
compiler fill them in), never retyped by hand. ioctl is wrapped to take an unsigned
long (Python's fcntl.ioctl passes a C int, which overflows for the TSS address
0xfffbd000) and to return -errno, so a caller on any thread gets its own error.

vmm_vcpu_run() issues KVM_RUN with the GIL released (cffi releases it around every
call), then copies the exit's union member into a flat struct, so Python never has to
know the layout of struct kvm_run's unions. vmm_host_cpuid() runs CPUID on the host,
to recognise the hypervisor we ourselves run under (see vmm/machine/cpu.py).
"""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
_HERE = Path(__file__).resolve().parent
_EXIT_STRUCT = (_HERE / "vmm_kvm.h").read_text()

_CONSTANTS = """
KVM_API_VERSION KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR
KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_SET_FPU KVM_SET_MSRS
KVM_SET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_MP_STATE KVM_SET_MP_STATE
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_PIT2 KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_EXT_CPUID
KVM_PIT_SPEAKER_DUMMY
KVM_EXIT_UNKNOWN KVM_EXIT_IO KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY
KVM_EXIT_INTR KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED
KVM_IOEVENTFD KVM_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_IRQFD
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_DEASSIGN
VHOST_GET_FEATURES VHOST_SET_FEATURES VHOST_SET_OWNER VHOST_SET_MEM_TABLE VHOST_SET_VRING_NUM
VHOST_SET_VRING_ADDR VHOST_SET_VRING_BASE VHOST_GET_VRING_BASE VHOST_SET_VRING_KICK
VHOST_SET_VRING_CALL VHOST_VSOCK_SET_GUEST_CID VHOST_VSOCK_SET_RUNNING
""".split()

ffibuilder.cdef("\n".join(f"#define {name} ..." for name in _CONSTANTS) + """

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    ...;
};
struct kvm_fpu { uint16_t fcw; uint32_t mxcsr; ...; };
struct kvm_msr_entry { uint32_t index; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_run { uint8_t immediate_exit; ...; };
struct kvm_ioeventfd { uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; ...; };
struct vhost_vring_state { unsigned int index; unsigned int num; };
struct vhost_vring_file { unsigned int index; int fd; };
struct vhost_vring_addr {
    unsigned int index; unsigned int flags;
    uint64_t desc_user_addr; uint64_t used_user_addr; uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};
struct vhost_memory_region {
    uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
    uint64_t flags_padding;
};
struct vhost_memory { uint32_t nregions; uint32_t padding; struct vhost_memory_region regions[]; };

""" + _EXIT_STRUCT + """

long vmm_ioctl(int fd, unsigned long request, unsigned long arg);
long vmm_ioctl_ptr(int fd, unsigned long request, void *arg);
long vmm_irq_line(int vm_fd, uint32_t irq, uint32_t level);
long vmm_vcpu_run(int vcpu_fd, struct kvm_run *run, struct vmm_exit *out);
void vmm_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
""")

ffibuilder.set_source("vmm._kvm", r"""
#include <cpuid.h>
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <linux/vhost.h>

#include "vmm_kvm.h"

static long vmm_ioctl(int fd, unsigned long request, unsigned long arg)
{
    long ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

static long vmm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    return vmm_ioctl(fd, request, (unsigned long)arg);
}

static long vmm_irq_line(int vm_fd, uint32_t irq, uint32_t level)
{
    struct kvm_irq_level line = { .irq = irq, .level = level };
    return vmm_ioctl_ptr(vm_fd, KVM_IRQ_LINE, &line);
}

static void vmm_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
}

static long vmm_vcpu_run(int vcpu_fd, struct kvm_run *run, struct vmm_exit *out)
{
    long ret = vmm_ioctl(vcpu_fd, KVM_RUN, 0);
    if (ret < 0)
        return ret;
    out->reason = run->exit_reason;
    out->detail = 0;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        out->io_in = run->io.direction == KVM_EXIT_IO_IN;
        out->size = run->io.size;
        out->port = run->io.port;
        out->count = run->io.count;
        out->data = (uint8_t *)run + run->io.data_offset;
        break;
    case KVM_EXIT_MMIO:
        out->addr = run->mmio.phys_addr;
        out->size = run->mmio.len;
        out->mmio_write = run->mmio.is_write;
        out->data = run->mmio.data;
        break;
    case KVM_EXIT_UNKNOWN:
        out->detail = run->hw.hardware_exit_reason;
        break;
    case KVM_EXIT_FAIL_ENTRY:
        out->detail = run->fail_entry.hardware_entry_failure_reason;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        out->detail = run->internal.suberror;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        out->detail = run->system_event.type;
        break;
    }
    return 0;
}
""", include_dirs=[str(_HERE)])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
