#!/usr/bin/env bash
# Installs what this project needs on Debian 12 (as root) and the project itself into
# .venv. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: python3-venv/-dev, gcc, libffi-dev (cffi), libcap-dev (python-prctl), liburing-dev
# (the disks' io_uring engine, native/blkio.c; built without it, O_DIRECT disks use Linux AIO).
# Run: libseccomp2 (pyseccomp). Tests and guest assets: qemu, busybox, e2fsprogs, cpio,
# acpica-tools (iasl), iproute2, lz4 (extracting the ELF vmlinux from the bzImage);
# debootstrap (the nested test image, scripts/build-l1.sh); strace (the seccomp usage
# recorder, scripts/seccomp_usage.py and `stratovirt seccomp usage`).
packages=(python3 python3-venv python3-dev gcc libc6-dev libffi-dev libcap-dev liburing-dev libseccomp2
          qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio lz4 acpica-tools iproute2
          debootstrap strace)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
# Editable in setuptools' compat mode: a .pth line puts the checkout on sys.path. The
# default mode's import hook costs every start of every process ~7 ms of imports
# (pathlib, importlib.util, urllib.parse...) before our first line (docs/performance.md).
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
    --config-settings editable_mode=compat
