#!/usr/bin/env bash
# Sets everything up, builds a Debian guest and runs the spec's example command line.
# Booting is not built yet: until it is, the example stops at -print-config, which
# validates the whole configuration against the real files and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/guest-assets.sh
socket=/tmp/stratovirt.socket
rm -f "$socket"
set -x
.venv/bin/stratovirt \
    -kernel assets/vmlinuz \
    -append console=ttyS0 root=/dev/vda rw reboot=k panic=1 \
    -drive file=assets/rootfs.ext4,id=rootfs,readonly=false \
    -api-channel unix:$socket \
    -serial stdio \
    -print-config
