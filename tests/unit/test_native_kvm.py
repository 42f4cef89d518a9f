"""The cffi KVM module: constants come from <linux/kvm.h>, ioctls reach the real /dev/kvm."""

import os

import pytest

from vmm._kvm import lib


def test_ioctl_numbers_are_the_headers():
    # _IO(KVMIO=0xAE, nr): no direction, no size.
    assert lib.KVM_GET_API_VERSION == 0xAE00
    assert lib.KVM_CREATE_VM == 0xAE01
    assert lib.KVM_CHECK_EXTENSION == 0xAE03


def test_errors_come_back_as_negative_errno():
    assert lib.vmm_ioctl(-1, lib.KVM_GET_API_VERSION, 0) == -9  # EBADF


@pytest.mark.needs_kvm
def test_real_kvm_api_version_and_an_unsigned_long_argument():
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert lib.vmm_ioctl(fd, lib.KVM_GET_API_VERSION, 0) == lib.KVM_API_VERSION == 12
        assert lib.vmm_ioctl(fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0) >= 4096
        vm = lib.vmm_ioctl(fd, lib.KVM_CREATE_VM, 0)
        assert vm >= 0
        os.close(vm)
    finally:
        os.close(fd)
