"""What each vCPU looks like to the guest: CPUID topology, MSRs, FPU, LAPIC wiring, and
the bootstrap processor's long-mode registers.

APIC id = vCPU index. The topology is one socket with one thread per core, so the
guest's /proc/cpuinfo shows `-smp N` as N cores. Application processors are left in
KVM's wait-for-SIPI state: the guest starts them with INIT/SIPI as on hardware.
"""

import struct

from .. import layout
from .._kvm import ffi, lib
from ..boot import longmode
from ..boot.loader import BootEntry
from .kvm import Vcpu

# CPUID bits.
LEAF1_ECX_XSAVE, LEAF1_ECX_OSXSAVE = 1 << 26, 1 << 27
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
TOPOLOGY_SMT, TOPOLOGY_CORE = 1, 2
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

# MSRs, with the values a freshly reset CPU would have that Linux relies on.
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
}

# Long mode as host.md found it to run on PVM hosts too.
CR0_LONG_MODE = 0x8005_0033      # PE MP ET NE WP AM PG
CR4_LONG_MODE = 0x20             # PAE
EFER_LONG_MODE = 0xD01           # SCE LME LMA NXE
RFLAGS_RESERVED = 0x2

APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
DELIVERY_EXTINT, DELIVERY_NMI = 7, 4


def _bits_for(count: int) -> int:
    """Width of the APIC-id field that numbers `count` cores."""
    return max(0, (count - 1).bit_length())


def host_hypervisor() -> str:
    """The vendor signature of the hypervisor this host runs under, or ""."""
    regs = ffi.new("uint32_t[4]")
    lib.vmm_host_cpuid(1, 0, regs)
    if not regs[2] & LEAF1_ECX_HYPERVISOR:
        return ""
    lib.vmm_host_cpuid(0x4000_0000, 0, regs)
    return struct.pack("<III", regs[1], regs[2], regs[3]).decode("ascii", "replace")


def xsave_works(hypervisor: str) -> bool:
    """QEMU 7.2's emulated SVM (TCG) does not intercept XSETBV, so a nested guest's
    XSETBV never reaches our KVM and its kernel WARNs and falls back; hide XSAVE there,
    as QEMU itself does with -cpu host,-xsave (shared/tools/nested-rig)."""
    return hypervisor != "TCGTCGTCGTCG"


def cpuid_for(index: int, vcpus: int, supported: list[dict], xsave: bool = True) -> list[dict]:
    """KVM's supported CPUID, with this vCPU's APIC id and the VM's topology."""
    entries = []
    for original in supported:
        entry = dict(original)
        leaf = entry["function"]
        if leaf == 0xD and not xsave:
            continue
        if leaf == 1:
            if not xsave:
                entry["ecx"] &= ~(LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE)
            entry["ebx"] = (index << 24) | (min(vcpus, 255) << 16) | (entry["ebx"] & 0xFFFF)
            entry["ecx"] |= LEAF1_ECX_HYPERVISOR
            entry["edx"] = entry["edx"] | LEAF1_EDX_HTT if vcpus > 1 else entry["edx"] & ~LEAF1_EDX_HTT
        elif leaf == 4:
            cache_level = (entry["eax"] >> 5) & 0x7
            sharing = vcpus - 1 if cache_level == 3 else 0
            entry["eax"] = ((entry["eax"] & 0x3FFF) | (min(sharing, 0xFFF) << 14)
                            | (min(vcpus - 1, 63) << 26))
        elif leaf in (0xB, 0x1F):
            continue  # rewritten below
        elif leaf == 0x8000_0008:
            entry["ecx"] = (entry["ecx"] & ~0xF0FF) | (_bits_for(vcpus) << 12) | (vcpus - 1)
        entries.append(entry)
    leaves = {e["function"] for e in supported}
    for leaf in (0xB, 0x1F):
        if leaf in leaves:
            entries += _topology_leaf(leaf, index, vcpus)
    return entries


def _topology_leaf(leaf: int, index: int, vcpus: int) -> list[dict]:
    levels = [(0, 1, TOPOLOGY_SMT), (_bits_for(vcpus), vcpus, TOPOLOGY_CORE), (0, 0, 0)]
    return [{"function": leaf, "index": sub, "flags": KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
             "eax": shift, "ebx": count, "ecx": (kind << 8) | sub, "edx": index}
            for sub, (shift, count, kind) in enumerate(levels)]


def configure(vcpu: Vcpu, vcpus: int, supported_cpuid: list[dict], xsave: bool) -> None:
    """Everything every vCPU needs before it first runs."""
    vcpu.set_cpuid(cpuid_for(vcpu.index, vcpus, supported_cpuid, xsave))
    vcpu.set_msrs(BOOT_MSRS)
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    for offset, mode in ((APIC_LVT_LINT0, DELIVERY_EXTINT), (APIC_LVT_LINT1, DELIVERY_NMI)):
        raw = ffi.buffer(lapic.regs)[offset:offset + 4]
        value = (struct.unpack("<I", raw)[0] & ~0x700) | (mode << 8)
        ffi.buffer(lapic.regs)[offset:offset + 4] = struct.pack("<I", value)
    vcpu.set_lapic(lapic)


def enter_long_mode(vcpu: Vcpu, entry: BootEntry) -> None:
    """The bootstrap vCPU starts at the kernel's 64-bit entry with paging on."""
    sregs = vcpu.get_sregs()
    code = dict(base=0, limit=0xFFFF_FFFF, selector=longmode.CODE_SELECTOR, type=0xB,
                present=1, dpl=0, db=0, s=1, l=1, g=1, avl=0, unusable=0)
    data = dict(code, selector=longmode.DATA_SELECTOR, type=0x3, db=1, l=0)
    tss = dict(code, selector=longmode.TSS_SELECTOR, type=0xB, s=0, l=0)
    for name, fields in (("cs", code), ("ds", data), ("es", data), ("fs", data),
                         ("gs", data), ("ss", data), ("tr", tss)):
        segment = getattr(sregs, name)
        for key, value in fields.items():
            setattr(segment, key, value)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(longmode.GDT) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cr0 = CR0_LONG_MODE
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = CR4_LONG_MODE
    sregs.efer = EFER_LONG_MODE
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rflags = RFLAGS_RESERVED
    regs.rip = entry.rip
    regs.rsi = entry.rsi
    regs.rsp = regs.rbp = entry.rsp
    vcpu.set_regs(regs)
