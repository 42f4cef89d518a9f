"""vsock stream throughput in the nested setup (tests/framework/nested.py): inside the
same L1, an L2 guest (Debian's stock kernel, guest/vsock-io) streams to and from L1
through our stratovirt and its vsock backend process, through QEMU's
vhost-user-vsock-device with the same backend as a program, and through QEMU's
vhost-vsock-device on L1's kernel vhost_vsock. Rounds rotate the order
(bench/l1_vsock.py); medians and ratios against each QEMU setup are printed.

    sudo .venv/bin/python bench/vsock.py [--rounds N] [--mib M]

Absolute figures mean little (every L2 instruction runs under an emulated hypervisor,
and our backend's Python runs under TCG in L1), but every setup pays the same
emulation: ours / qemu-user compares our VMM's transport with QEMU's for one backend;
ours / qemu-kernel compares the whole userspace path with the kernel's vhost.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework.nested import NestedRig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=16, help="MiB per transfer")
    args = parser.parse_args()
    with NestedRig(echo=False) as rig:
        rig.base()
        result = rig.run(f"python3 l1_vsock.py {args.rounds} {args.mib}",
                         files={"l1_vsock.py": ROOT / "bench" / "l1_vsock.py",
                                "console.py": ROOT / "tests" / "framework" / "console.py"},
                         timeout=7200)
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.output
            if line.startswith("RESULT ")]
    notes = [line for line in result.output if line.startswith("NOTE ")]
    if result.status or not rows:
        print(result.console[-6000:])
        return 1
    print(f"{args.mib} MiB per transfer, {args.rounds} rounds, MiB/s (median):")
    setups = sorted({r["vmm"] for r in rows}, key=["ours", "qemu-user", "qemu-kernel"].index)
    for direction in ("guest_to_host", "host_to_guest"):
        rates = {vmm: statistics.median(r["mib"] / r["seconds"] for r in rows
                                        if r["vmm"] == vmm and r["direction"] == direction)
                 for vmm in setups}
        line = "  ".join(f"{vmm} {rate:8.2f}" for vmm, rate in rates.items())
        ratios = "  ".join(f"ours/{vmm} {rates['ours'] / rates[vmm]:.2f}"
                           for vmm in setups if vmm != "ours")
        print(f"  {direction:14} {line}  {ratios}")
    for note in notes:
        print(" ", note)
    for row in rows:
        print("  ", json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
