"""virtio-net throughput, our backend against QEMU's own userspace virtio-net, in the
nested setup (tests/framework/nested.py): both VMMs run inside the same L1 on its
/dev/kvm (nested SVM under QEMU TCG), boot the same Debian kernel and initramfs as L2
with 2 vCPUs and 512 MiB, and carry TCP over the same tap to L1. Rounds alternate
(bench/l1_net.py); medians and the ratio ours / QEMU per direction are printed.

    sudo .venv/bin/python bench/net.py [--rounds N] [--mib M]

Absolute figures mean little (every L2 instruction runs under an emulated hypervisor),
but both sides pay the same emulation, so the ratio compares the device paths:
guest kick -> our ioeventfd -> backend process -> tap, against QEMU's main loop
serving its own virtio-net on the same tap (vhost=off: no vhost-net in L1's kernel
path either way).
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
        result = rig.run(f"python3 l1_net.py {args.rounds} {args.mib}",
                         files={"l1_net.py": ROOT / "bench" / "l1_net.py",
                                "console.py": ROOT / "tests" / "framework" / "console.py"},
                         timeout=3600)
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.output
            if line.startswith("RESULT ")]
    if result.status or not rows:
        print(result.console[-4000:])
        return 1
    print(f"{args.mib} MiB per transfer, {args.rounds} rounds, MiB/s (median):")
    for direction in ("guest_to_host", "host_to_guest"):
        rates = {}
        for vmm in ("ours", "qemu"):
            rates[vmm] = statistics.median(r["mib"] / r["seconds"] for r in rows
                                           if r["vmm"] == vmm and r["direction"] == direction)
        print(f"  {direction:14} ours {rates['ours']:8.2f}  qemu {rates['qemu']:8.2f}  "
              f"ratio {rates['ours'] / rates['qemu']:.2f}")
    for row in rows:
        print("  ", json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
