"""Boot Debian's stock kernel under our stratovirt and use its shell over ttyS0.

    demo_session.py KERNEL INITRD

Runs wherever /dev/kvm can run a stock Linux guest: directly on a VMX/SVM host, or
inside the nested rig's L1 (scripts/setup-and-run.sh picks). The console is echoed
with an `L2|` prefix.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "tests", "framework"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from console import Vm  # noqa: E402

kernel, initrd = sys.argv[1:3]
api = "/tmp/stratovirt-demo.socket"
if os.path.exists(api):
    os.unlink(api)
vm = Vm(["stratovirt", "-kernel", kernel, "-initrd", initrd,
         "-append", "console=ttyS0", "reboot=k", "panic=1", "quiet",
         "-smp", "2", "-m", "256M", "-api-channel", f"unix:{api}", "-serial", "stdio"])
try:
    vm.expect("initramfs: ready")
    vm.send("uname -a; echo cpus: $(grep -c ^processor /proc/cpuinfo); "
            "grep MemTotal /proc/meminfo; echo demo-done\n")
    vm.expect("^demo-done$")
    vm.send("reboot -f\n")
    status = vm.wait()
finally:
    vm.kill()
print(f"demo: the VM ended with status {status}")
sys.exit(status)
