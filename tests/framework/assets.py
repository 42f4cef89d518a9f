"""Debian's own guest: the stock cloud kernel, a busybox initramfs, a rootfs image.

Built by scripts/guest-assets.sh into assets/ (not committed) the first time a test
asks for them.
"""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"


def guest_assets() -> Path:
    if not all((ASSETS / name).exists() for name in ("vmlinuz", "vmlinux", "initrd.img", "rootfs.ext4")):
        subprocess.run([str(ROOT / "scripts" / "guest-assets.sh")], check=True,
                       stdout=subprocess.DEVNULL)
    return ASSETS
