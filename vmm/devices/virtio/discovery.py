"""How a guest kernel finds the virtio-mmio slots. Both ways are always offered:

- `virtio_mmio.device=4K@0x<base>:<irq>` words appended to the kernel command line, one
  per slot, as StratoVirt does: the only way for minimal microVM kernels built without
  ACPI but with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
- One LNRO0005 device per slot in the ACPI DSDT (vmm/acpi/tables.py): the only way for
  distribution kernels such as Debian's, which lack the command-line option.

A kernel that has both registers each window twice; the second registration of a
window fails (the guest logs -EBUSY for it) and the device is found once. A kernel
without the option (Debian's) ignores the words. We cannot tell from the image which
kind a kernel is without decompressing it, so we do not try.

Every slot is described, empty or not (spec.md: the slots exist from boot): an empty
disk slot is a disk of capacity 0, an empty NIC slot is a placeholder (device ID 0).
"""

from ... import layout

SLOTS = layout.BLK_SLOTS + layout.NET_SLOTS      # always there; other devices follow


def slot_count(console: bool, vsock: bool, rng: bool) -> int:
    """How many slots a machine has: the disks' and NICs', and one per other device
    that is configured (in this order: console, vsock, rng)."""
    return SLOTS + console + vsock + rng


def cmdline_devices(slots: int = SLOTS) -> str:
    """The words StratoVirt appends: `virtio_mmio.device=4K@0x<base>:<irq>` per slot."""
    words = []
    for index in range(slots):
        base, irq = layout.virtio_mmio_slot(index)
        words.append(f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE >> 10}K@{base:#x}:{irq}")
    return " ".join(words)


def kernel_cmdline(boot_args: str, slots: int = SLOTS) -> str:
    """The command line the guest kernel gets: the user's, then the slots."""
    devices = cmdline_devices(slots)
    return f"{boot_args} {devices}" if boot_args else devices
