"""The tiny test guest (guest/tiny.S), built with gcc on demand and cached by content."""

import hashlib
import subprocess
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parents[2] / "guest"
CACHE_DIR = Path("/tmp/stratovirt-py-guest")


def tiny_guest() -> Path:
    sources = [GUEST_DIR / "tiny.S", GUEST_DIR / "tiny.ld"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    target = CACHE_DIR / f"tiny-{digest}.elf"
    if not target.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
                        f"-Wl,-T,{sources[1]}", "-o", str(partial), str(sources[0])], check=True)
        partial.rename(target)
    return target
