"""MachineConfig: the one immutable, validated product of the configuration.

No module outside vmm.config reads argv or the JSON file; everything else takes one of
these. Paths are absolute; sizes are bytes; optional things are None.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BootSource:
    kernel: Path
    boot_args: str
    initrd: Path | None


@dataclass(frozen=True)
class MachineSpec:
    name: str
    vcpus: int
    mem_size: int
    omit_vm_memory: bool


@dataclass(frozen=True)
class Bucket:
    """A token bucket, Firecracker's TokenBucket: `size` tokens, refilled at size per
    `refill_time` ms, starting full; a one-time burst spent first and never refilled."""
    size: int
    refill_time: int          # ms
    one_time_burst: int = 0


@dataclass(frozen=True)
class RateLimit:
    """A device's limits (vmm/config/ratelimit.py says how each form maps here)."""
    bandwidth: Bucket | None = None     # bytes
    ops: Bucket | None = None           # requests


@dataclass(frozen=True)
class Drive:
    id: str
    path: Path
    read_only: bool
    direct: bool
    serial: str | None
    num_queues: int = 1     # derived: one per vCPU, at most 8 (layout.disk_queues)
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Nic:
    id: str
    tap: str
    mac: str | None  # lower case aa:bb:cc:dd:ee:ff
    rx_rate_limit: RateLimit | None = None
    tx_rate_limit: RateLimit | None = None
    fd: int | None = None    # a tap the caller passed (2.x fds=); `tap` is then its name


@dataclass(frozen=True)
class Console:
    id: str
    socket: Path


@dataclass(frozen=True)
class Vsock:
    id: str
    guest_cid: int
    # The userspace device's host socket, derived: <api-channel's directory>/<id>.vsock
    # (docs/machine.md); None for the kernel's vhost-vsock.
    socket: Path | None
    vhost: bool = False      # the kernel's vhost-vsock (2.x's vhost-vsock-device)
    fd: int | None = None    # its /dev/vhost-vsock, passed by the caller (vhostfd=)


@dataclass(frozen=True)
class Rng:
    """virtio-rng: entropy from `source` (a character device), at most max_bytes per
    period ms."""
    id: str
    source: Path
    max_bytes: int
    period: int      # ms


@dataclass(frozen=True)
class BackendRestart:
    """-backend-restart: at most `restarts` restarts of one device's backend in any
    `window` seconds (vmm/restart.py)."""
    restarts: int
    window: int


@dataclass(frozen=True)
class MachineConfig:
    boot: BootSource
    machine: MachineSpec
    drives: tuple[Drive, ...]
    nics: tuple[Nic, ...]
    console: Console | None
    vsock: Vsock | None
    serial_stdio: bool
    api_channel: Path
    log_file: Path | None
    pidfile: Path | None
    daemonize: bool
    seccomp: bool
    backend_restart: BackendRestart
    metrics_file: Path | None = None
    log_stdout: bool = False         # 2.x's -D alone (vmm/log.py)
    rng: Rng | None = None
