"""Boot Debian's stock kernel under our stratovirt, its root filesystem on a virtio disk,
and use its shell over ttyS0.

    demo_session.py KERNEL INITRD ROOTFS

The initramfs loads the virtio modules, mounts root=/dev/vda read-write and switches
to it; the guest writes a file there and powers off.

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

kernel, initrd, rootfs = sys.argv[1:4]
api = "/tmp/stratovirt-demo.socket"
if os.path.exists(api):
    os.unlink(api)
vm = Vm(["stratovirt", "-kernel", kernel, "-initrd", initrd,
         "-append", "console=ttyS0", "root=/dev/vda", "rw", "reboot=k", "panic=1", "quiet",
         "-drive", f"file={rootfs},id=rootfs,readonly=false",
         "-smp", "2", "-m", "256M", "-api-channel", f"unix:{api}", "-serial", "stdio"])
try:
    vm.expect("rootfs: ready")
    vm.send("uname -a; echo cpus: $(grep -c ^processor /proc/cpuinfo); "
            "grep MemTotal /proc/meminfo; grep ' / ' /proc/mounts; "
            "date > /demo-was-here; sync; echo demo-done\n")
    vm.expect("^demo-done$")
    vm.send("poweroff\n")
    status = vm.wait()
finally:
    vm.kill()
print(f"demo: the VM ended with status {status}")
sys.exit(status)
