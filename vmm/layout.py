"""The x86_64 microVM's guest physical address map: StratoVirt v0.1.0's, in one place.

Every address a guest could notice is here, so the loaders, the memory map, the MP
table and (later) the ACPI tables agree by construction.
"""

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Boot structures in low memory.
GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000          # struct boot_params
BOOT_STACK_ADDR = 0x8FF0         # initial RSP/RBP
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000                 # one PD of 2 MiB pages: the first 1 GiB identity-mapped
CMDLINE_ADDR = 0x20000
EBDA_ADDR = 0x9FC00              # the MP table lives here; reserved in E820
EBDA_END = 0xA0000
ACPI_ADDR = 0xE0000              # RSDP, then the other ACPI tables
ACPI_END = 0x100000
HIMEM_START = 0x100000           # kernels load at or above 1 MiB
INITRD_ADDR_MAX = 0x37FFFFFF     # top of the initrd, as StratoVirt places it

# RAM is [0, min(size, MMIO_HOLE_START)) plus [HIGH_RAM_START, ...) for the rest.
MMIO_HOLE_START = 0xD000_0000
HIGH_RAM_START = 4 * GiB

# Devices.
VIRTIO_MMIO_BASE = 0xD000_0000   # one 4 KiB window per slot
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_FIRST_IRQ = 5
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
IDENTITY_MAP_ADDR = 0xFFFB_C000  # KVM's EPT identity page (Intel), one page
TSS_ADDR = 0xFFFB_D000           # KVM's real-mode TSS, three pages

SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
RTC_PORT = 0x70
ACPI_SLEEP_PORT = 0x3C0          # sleep control (0x3C0) and status (0x3C1) registers
POWER_BUTTON_GSI = 16            # the ACPI GED's interrupt: IOAPIC pin 16, above ISA's 0..15


# virtio-mmio slots (StratoVirt's): 6 disks, then 2 NICs, then the other devices.
BLK_SLOTS, NET_SLOTS = 6, 2
MAX_VIRTIO_SLOTS = 11            # IRQs 5..15
# A disk slot's queues (virtio-blk MQ): one per vCPU, as QEMU gives a virtio-blk device,
# at most this many (each is a thread and an I/O engine in the disk's backend, and an
# ioeventfd in the vm process). Every disk slot has the same number, empty or not, so a
# disk hot-plugged into a slot the guest already probed fits it.
MAX_DISK_QUEUES = 8


def disk_queues(vcpus: int) -> int:
    return max(1, min(vcpus, MAX_DISK_QUEUES))


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(MMIO base, IRQ) of slot `index`."""
    if not 0 <= index < MAX_VIRTIO_SLOTS:
        raise ValueError(f"virtio-mmio slot {index}; there are {MAX_VIRTIO_SLOTS}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_FIRST_IRQ + index


def ioapic_id(vcpus: int) -> int:
    """The first APIC id after the vCPUs' (0..vcpus-1): at most 254, never 255 (broadcast)."""
    return vcpus


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """(guest physical address, size) of each RAM range, in memfd order."""
    low = min(mem_size, MMIO_HOLE_START)
    regions = [(0, low)]
    if mem_size > low:
        regions.append((HIGH_RAM_START, mem_size - low))
    return regions


def low_ram_end(mem_size: int) -> int:
    return min(mem_size, MMIO_HOLE_START)
