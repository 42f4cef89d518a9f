"""How a guest kernel finds the virtio-mmio slots: `virtio_mmio.device=` words on its
command line (kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, StratoVirt's way)
and LNRO0005 devices in the ACPI DSDT (vmm/acpi/tables.py, for distribution kernels
such as Debian's, which lack the command-line option). Not wired into the boot yet:
the slots' transport comes first (issue 4)."""

from ... import layout


def cmdline_devices(slots: int) -> str:
    """The words StratoVirt appends: `virtio_mmio.device=4K@0x<base>:<irq>` per slot."""
    words = []
    for index in range(slots):
        base, irq = layout.virtio_mmio_slot(index)
        words.append(f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE >> 10}K@{base:#x}:{irq}")
    return " ".join(words)
