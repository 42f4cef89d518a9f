"""Every limit and default of the configuration, in one place.

The ranges are those of StratoVirt's x86_64 microVM (shared/docs/spec.md); the few
additions (id syntax, serial length, socket path length) come from what the guest or
the host can actually carry, and each says where it comes from.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

VCPUS = (1, 254)
MEM_SIZE = (128 * MiB, 512 * GiB)
# Guest RAM is mapped into KVM memory slots page by page.
MEM_ALIGN = 4 * KiB
NAME_CHARS = (1, 255)

MAX_DRIVES = 6
MAX_NICS = 2
MAX_CONSOLES = 1
MAX_VSOCKS = 1
# Devices besides disks and NICs on x86_64 (12 on AArch64, which we do not target).
MAX_OTHER_DEVICES = 2
# virtio-rng, which the seed does not have (StratoVirt 2.x's, Kata always adds one): a
# slot of its own after those two, so Kata's console + vsock + rng fit (the last IRQ, 15;
# docs/configuration.md, "virtio-rng").
MAX_RNGS = 1
# Its rate limit: max_bytes per period ms (QEMU's and StratoVirt's virtio-rng-device
# properties), as a byte token bucket. The rate max_bytes * 1000 / period is checked
# against StratoVirt's bounds; the period is at most the limiter's longest refill.
RNG_MAX_BYTES = (1, 2**63 - 1)
RNG_PERIOD_MS = (1, 3_600_000)
RNG_RATE = (64, 1_000_000_000)          # bytes per second
# Without max-bytes/period a guest still gets at most 64 KiB/s: one tenant cannot keep
# the host's entropy source (or a backend's CPU) busy. QEMU's default is unlimited.
DEFAULT_RNG_MAX_BYTES = 65536
DEFAULT_RNG_PERIOD_MS = 1000

# Device ids become QMP identifiers and process names: QEMU's rule for ids.
ID_CHARS = (1, 64)
ID_PATTERN = r"[A-Za-z][A-Za-z0-9._-]*"       # a letter, then letters, digits, '-', '.', '_'
# VIRTIO_BLK_ID_BYTES: the GET_ID reply is 20 bytes, not NUL-terminated when full.
DRIVE_SERIAL_BYTES = (1, 20)
# IFNAMSIZ is 16 including the terminating NUL.
TAP_NAME_BYTES = (1, 15)
# VMADDR_CID_HOST is 2; 0xFFFFFFFF is VMADDR_CID_ANY.
GUEST_CID = (3, 0xFFFF_FFFE)
# COMMAND_LINE_SIZE on x86 is 2048 bytes including the NUL.
BOOT_ARGS_BYTES = 2047
# sun_path is 108 bytes including the NUL.
SOCKET_PATH_BYTES = 107
# The vsock device's host sockets: <api-channel's directory>/<id><VSOCK_SUFFIX>, and for
# guest-initiated streams <that>_<port>, the port up to 4294967295 (10 digits).
VSOCK_SUFFIX = ".vsock"
VSOCK_PORT_SUFFIX_BYTES = len("_4294967295")

# -backend-restart: a device's backend is restarted at most RESTARTS times in any WINDOW
# seconds; the death after that fails the device (vmm/restart.py).
BACKEND_RESTARTS = (0, 100)
BACKEND_RESTART_WINDOW = (1, 3600)
DEFAULT_BACKEND_RESTARTS = 5
DEFAULT_BACKEND_RESTART_WINDOW = 60

DEFAULT_NAME = "stratovirt"
DEFAULT_VCPUS = 1
DEFAULT_MEM_SIZE = 256 * MiB
# StratoVirt opens disks with O_DIRECT unless told otherwise.
DEFAULT_DIRECT = True
DEFAULT_READ_ONLY = False
