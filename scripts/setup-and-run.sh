#!/usr/bin/env bash
# Sets everything up, builds a Debian guest and boots it under our stratovirt: Debian's
# stock cloud kernel with a busybox initramfs, two vCPUs, a shell on ttyS0 that runs a
# few commands and reboots. On a host whose /dev/kvm runs stock guests (VMX/SVM) the VM
# runs directly; on a PVM host (like this project's machines) it runs inside the nested
# rig: QEMU TCG with nested SVM, our VMM inside the L1 (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/guest-assets.sh
export PATH="$PWD/.venv/bin:$PATH"
if grep -qw -e vmx -e svm /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
    echo "setup-and-run: this host has VMX/SVM: booting directly"
    exec python scripts/demo_session.py assets/vmlinuz assets/initrd.img assets/rootfs.ext4
fi
echo "setup-and-run: /dev/kvm here is not VMX/SVM (PVM?): booting inside the nested rig"
exec python scripts/nested_demo.py
