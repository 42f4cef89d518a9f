"""Debian's own guest: the stock cloud kernel, a busybox initramfs, a rootfs image.

Built by scripts/guest-assets.sh into assets/ (not committed) the first time a test
asks for them, and again when the script or what it builds in (guest/vsock-io.c)
changed: the script writes a stamp of those into assets/.stamp.
"""

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
SCRIPT = ROOT / "scripts" / "guest-assets.sh"
INPUTS = (SCRIPT, ROOT / "guest" / "vsock-io.c")
NAMES = ("vmlinuz", "vmlinux", "initrd.img", "rootfs.ext4")


def _stamp() -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in INPUTS)).hexdigest()[:16]


def guest_assets() -> Path:
    stamp = ASSETS / ".stamp"
    current = stamp.read_text().strip() if stamp.exists() else ""
    if current != _stamp() or not all((ASSETS / name).exists() for name in NAMES):
        subprocess.run([str(SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    return ASSETS
