"""KVM objects (system, VM, vCPU) over the cffi binding in vmm._kvm.

Thin on purpose: each method is one ioctl, raising KvmError with the ioctl's name and
errno. What to put in the registers is decided elsewhere (vmm/machine/cpu.py).
"""

import errno
import mmap
import os

from .._kvm import ffi, lib

KVM_PATH = "/dev/kvm"
MAX_CPUID_ENTRIES = 256


class KvmError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise KvmError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def open_kvm() -> int:
    """Open /dev/kvm and check its API version; OSError tells the user what is wrong."""
    fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    version = lib.vmm_ioctl(fd, lib.KVM_GET_API_VERSION, 0)
    if version != lib.KVM_API_VERSION:
        os.close(fd)
        raise KvmError(errno.ENOTSUP, f"{KVM_PATH} speaks KVM API {version}, "
                                      f"not {lib.KVM_API_VERSION}")
    return fd


class Kvm:
    def __init__(self, fd: int):
        self.fd = fd

    def check_extension(self, capability: int) -> int:
        return lib.vmm_ioctl(self.fd, lib.KVM_CHECK_EXTENSION, capability)

    def vcpu_mmap_size(self) -> int:
        return _check(lib.vmm_ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0),
                      "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[dict]:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"entries": MAX_CPUID_ENTRIES})
        cpuid.nent = MAX_CPUID_ENTRIES
        _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid),
               "KVM_GET_SUPPORTED_CPUID")
        keys = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
        return [{k: getattr(cpuid.entries[i], k) for k in keys} for i in range(cpuid.nent)]

    def create_vm(self) -> "Vm":
        return Vm(self, _check(lib.vmm_ioctl(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM"))


class Vm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_tss_address(self, address: int) -> None:
        _check(lib.vmm_ioctl(self.fd, lib.KVM_SET_TSS_ADDR, address), "KVM_SET_TSS_ADDR")

    def set_identity_map_address(self, address: int) -> None:
        value = ffi.new("uint64_t *", address)
        _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value),
               "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _check(lib.vmm_ioctl(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def create_pit(self) -> None:
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config), "KVM_CREATE_PIT2")

    def set_memory_region(self, slot: int, guest_address: int, size: int, host_address: int) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.guest_phys_addr = guest_address
        region.memory_size = size
        region.userspace_addr = host_address
        _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
               "KVM_SET_USER_MEMORY_REGION")

    def irq_line(self, irq: int, level: bool) -> None:
        _check(lib.vmm_irq_line(self.fd, irq, int(level)), "KVM_IRQ_LINE")

    def ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None,
                  assign: bool = True) -> None:
        """An MMIO write of `length` bytes at `address` (of value `datamatch`, if given)
        signals eventfd `fd` inside KVM, without an exit to userspace."""
        request = ffi.new("struct kvm_ioeventfd *")
        request.addr, request.len, request.fd = address, length, fd
        request.flags = 0 if assign else lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        if datamatch is not None:
            request.datamatch = datamatch
            request.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, request), "KVM_IOEVENTFD")

    def irqfd(self, fd: int, gsi: int, assign: bool = True) -> None:
        """A write to eventfd `fd` pulses interrupt line `gsi` inside KVM."""
        request = ffi.new("struct kvm_irqfd *")
        request.fd, request.gsi = fd, gsi
        request.flags = 0 if assign else lib.KVM_IRQFD_FLAG_DEASSIGN
        _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_IRQFD, request), "KVM_IRQFD")

    def create_vcpu(self, index: int) -> "Vcpu":
        fd = _check(lib.vmm_ioctl(self.fd, lib.KVM_CREATE_VCPU, index), "KVM_CREATE_VCPU")
        return Vcpu(index, fd, self.kvm.vcpu_mmap_size())


class Vcpu:
    def __init__(self, index: int, fd: int, mmap_size: int):
        self.index = index
        self.fd = fd
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_area = ffi.cast("struct kvm_run *", ffi.from_buffer(self._run_map))
        self.exit = ffi.new("struct vmm_exit *")

    def run(self) -> int:
        """KVM_RUN once (GIL released); 0 with self.exit filled in, or -errno."""
        return lib.vmm_vcpu_run(self.fd, self.run_area, self.exit)

    def _get(self, request: int, ctype: str, what: str):
        value = ffi.new(ctype)
        _check(lib.vmm_ioctl_ptr(self.fd, request, value), what)
        return value

    def _set(self, request: int, value, what: str) -> None:
        _check(lib.vmm_ioctl_ptr(self.fd, request, value), what)

    def get_regs(self):
        return self._get(lib.KVM_GET_REGS, "struct kvm_regs *", "KVM_GET_REGS")

    def set_regs(self, regs) -> None:
        self._set(lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        return self._get(lib.KVM_GET_SREGS, "struct kvm_sregs *", "KVM_GET_SREGS")

    def set_sregs(self, sregs) -> None:
        self._set(lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_fpu(self, fpu) -> None:
        self._set(lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_lapic(self):
        return self._get(lib.KVM_GET_LAPIC, "struct kvm_lapic_state *", "KVM_GET_LAPIC")

    def set_lapic(self, lapic) -> None:
        self._set(lib.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def set_cpuid(self, entries: list[dict]) -> None:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            for key, value in entry.items():
                setattr(cpuid.entries[i], key, value)
        self._set(lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def set_msrs(self, msrs: dict[int, int]) -> None:
        table = ffi.new("struct kvm_msrs *", {"entries": len(msrs)})
        table.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs.items()):
            table.entries[i].index = index
            table.entries[i].data = data
        done = _check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_SET_MSRS, table), "KVM_SET_MSRS")
        if done != len(msrs):
            failed = list(msrs)[done]
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {failed:#x} was refused")

    def get_mp_state(self) -> int:
        return self._get(lib.KVM_GET_MP_STATE, "struct kvm_mp_state *",
                         "KVM_GET_MP_STATE").mp_state
