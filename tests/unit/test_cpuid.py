"""The CPUID each vCPU gets: APIC ids, topology leaves, the nested XSAVE work-around."""

import os

import pytest

from vmm.machine import cpu
from vmm.machine.kvm import Kvm, open_kvm

SUPPORTED = [
    {"function": 0, "index": 0, "flags": 0, "eax": 0x1F, "ebx": 0, "ecx": 0, "edx": 0},
    {"function": 1, "index": 0, "flags": 0, "eax": 0x806F8, "ebx": 0x0800,
     "ecx": cpu.LEAF1_ECX_XSAVE | cpu.LEAF1_ECX_OSXSAVE | 1, "edx": 1 << 28},
    {"function": 4, "index": 3, "flags": 1, "eax": (3 << 5) | 0x3, "ebx": 0, "ecx": 0, "edx": 0},
    {"function": 0xB, "index": 0, "flags": 1, "eax": 1, "ebx": 2, "ecx": 0x100, "edx": 7},
    {"function": 0xD, "index": 0, "flags": 1, "eax": 7, "ebx": 0, "ecx": 0, "edx": 0},
]


def leaf(entries, function, index=0):
    [entry] = [e for e in entries if e["function"] == function and e["index"] == index]
    return entry


@pytest.mark.parametrize("index,vcpus", [(0, 1), (3, 4), (253, 254)])
def test_apic_id_and_topology(index, vcpus):
    entries = cpu.cpuid_for(index, vcpus, SUPPORTED)
    one = leaf(entries, 1)
    assert one["ebx"] >> 24 == index and (one["ebx"] >> 16) & 0xFF == vcpus
    assert one["ebx"] & 0xFFFF == 0x0800                      # CLFLUSH size kept
    assert one["ecx"] & cpu.LEAF1_ECX_HYPERVISOR
    assert bool(one["edx"] & cpu.LEAF1_EDX_HTT) == (vcpus > 1)
    smt, core, end = (leaf(entries, 0xB, i) for i in range(3))
    assert (smt["ebx"], (smt["ecx"] >> 8) & 0xFF, smt["edx"]) == (1, cpu.TOPOLOGY_SMT, index)
    assert (core["ebx"], (core["ecx"] >> 8) & 0xFF, core["edx"]) == (vcpus, cpu.TOPOLOGY_CORE, index)
    assert 1 << core["eax"] >= vcpus and (core["eax"] == 0 or 1 << (core["eax"] - 1) < vcpus)
    assert end["ecx"] >> 8 == 0
    l3 = leaf(entries, 4, 3)
    assert l3["eax"] >> 26 == min(vcpus - 1, 63) and (l3["eax"] >> 14) & 0xFFF == vcpus - 1


def test_xsave_hidden_only_under_tcg():
    assert cpu.xsave_works("KVMKVMKVM\0\0\0") and not cpu.xsave_works("TCGTCGTCGTCG")
    hidden = cpu.cpuid_for(0, 1, SUPPORTED, xsave=False)
    assert not leaf(hidden, 1)["ecx"] & (cpu.LEAF1_ECX_XSAVE | cpu.LEAF1_ECX_OSXSAVE)
    assert not [e for e in hidden if e["function"] == 0xD]
    assert leaf(cpu.cpuid_for(0, 1, SUPPORTED), 1)["ecx"] & cpu.LEAF1_ECX_XSAVE


@pytest.mark.needs_kvm
def test_real_supported_cpuid_is_accepted_by_kvm():
    kvm = Kvm(open_kvm())
    try:
        vm = kvm.create_vm()
        vm.create_irqchip()
        supported = kvm.supported_cpuid()
        assert leaf(supported, 0)
        for index in range(2):
            cpu.configure(vm.create_vcpu(index), 2, supported, xsave=True)
    finally:
        os.close(kvm.fd)
