"""What a front end (command line or JSON file) hands to validation.

Both front ends turn their syntax into typed values, each tagged with `where` it came
from (`-smp`, `machine-config.vcpu_count`), so range and consistency checks are written
once yet their messages still name the exact option or JSON path the user wrote.
"""

from dataclasses import dataclass, field
from typing import Any

# Settings of the machine as a whole, by their internal names.
SCALARS = ("kernel", "boot_args", "initrd", "name", "vcpus", "mem_size",
           "omit_vm_memory", "serial_stdio", "api_channel", "log_file", "log_stdout", "pidfile",
           "daemonize", "disable_seccomp", "backend_restarts", "backend_restart_window",
           "metrics_file")

# Device kinds and their fields, by internal names.
DEVICE_FIELDS = {
    "drive": ("id", "path", "read_only", "direct", "serial", "rate_limit"),
    "nic": ("id", "tap", "tap_fd", "mac", "rx_rate_limit", "tx_rate_limit"),
    "console": ("id", "socket"),
    "vsock": ("id", "guest_cid", "vhost", "vhost_fd"),
    "rng": ("id", "source", "max_bytes", "period"),
}


@dataclass(frozen=True)
class Setting:
    value: Any
    where: str


@dataclass
class Item:
    """One device as written: its fields and where the device itself was written."""
    kind: str
    where: str
    fields: dict[str, Setting] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.fields["id"].value


@dataclass
class Draft:
    scalars: dict[str, Setting] = field(default_factory=dict)
    devices: dict[str, list[Item]] = field(
        default_factory=lambda: {kind: [] for kind in DEVICE_FIELDS})
