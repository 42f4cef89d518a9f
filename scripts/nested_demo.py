"""The demo on a host whose /dev/kvm cannot run a stock Linux guest (PVM): inside the
nested rig's L1 (QEMU TCG with nested SVM, tests/framework/nested.py)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework.nested import NestedRig  # noqa: E402

with NestedRig(echo=False) as rig:
    result = rig.run("python3 demo_session.py /l2/vmlinuz /l2/initrd.img /l2/rootfs.ext4",
                     files={"demo_session.py": ROOT / "scripts" / "demo_session.py",
                            "console.py": ROOT / "tests" / "framework" / "console.py"},
                     timeout=900)
print("\n".join(result.output))
sys.exit(result.status)
