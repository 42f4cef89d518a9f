"""ACPI tables: how a stock distribution kernel finds the vCPUs, the IOAPIC and (later)
the virtio-mmio devices. Debian's cloud kernel is built without MP-table support
(CONFIG_X86_MPPARSE is not set), so without these it boots on one CPU with no IOAPIC.
"""
