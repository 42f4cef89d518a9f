#!/usr/bin/env bash
# Builds (as root) the cached L1 base for the nested tests (tests/framework/nested.py) and
# prints its directory as the last line on stdout:
#   l1.img       sparse ext4: Debian bookworm minbase + python3, qemu-system-x86, iproute2,
#                busybox, kmod, strace, the L1 kernel's modules, and a venv /opt/vmm holding the
#                project's runtime dependencies (not the project: each run installs it fresh)
#   vmlinuz      Debian's stock cloud kernel, the one scripts/guest-assets.sh uses for L2
#   initrd.img   busybox initramfs: virtio-pci + virtio-blk, mount /dev/vda, switch_root
# Why: this host's /dev/kvm is PVM and runs no stock kernel, so the tests run our VMM in an
# L1 under QEMU TCG with emulated SVM (../shared/docs/host.md, "way 3").
#
# The cache ($NESTED_CACHE, default /var/cache/stratovirt-py/nested) is keyed by a hash of
# this script and pyproject.toml's dependency list: a second call only prints the path
# (debs/ there keeps the downloaded packages for the next build). A
# build happens in a temporary directory renamed into place when complete, so an
# interrupted build never leaves something that looks finished. Builds of older keys are
# deleted after a new one is in place. Log of a build: build.log in its directory.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${NESTED_CACHE:-/var/cache/stratovirt-py/nested}
deps=$(/usr/bin/python3 -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
key=$({ cat scripts/build-l1.sh; echo "$deps"; } | sha256sum | cut -c1-16)
out=$cache/l1-$key
if [ -s "$out/l1.img" ]; then echo "$out"; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "build-l1: needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-l1: no debootstrap; run scripts/setup.sh" >&2; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9                                  # one build at a time; the waiter then finds it done
if [ -s "$out/l1.img" ]; then echo "$out"; exit 0; fi

# Remove what an interrupted build left: unmount first, never follow a mount point.
discard() {
    findmnt -rno TARGET | grep -F "$1/" | sort -r | xargs -r -n1 umount -l || true
    rm -rf --one-file-system "$1"
}
for old in "$cache"/tmp.*; do [ -e "$old" ] && discard "$old"; done
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'discard "$work"' EXIT
root=$work/root
log=$work/build.log
step() { echo "build-l1: $* ($(date +%T))" >&2; }
run() { "$@" >>"$log" 2>&1 || { echo "build-l1: failed: $*; log tail:" >&2; tail -n 30 "$log" >&2; exit 1; }; }
# chroot with a clean environment: the host's PIP_* and proxy settings do not belong inside.
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
                DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"; }

step "kernel package"
kernel_package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$kernel_package" ]; then
    run apt-get update -q
    kernel_package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
mkdir -p "$work/deb" && chmod 755 "$work/deb"
(cd "$work/deb" && run apt-get download -q -o APT::Sandbox::User=root "$kernel_package")
run dpkg-deb -x "$work"/deb/linux-image-*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")

step "debootstrap bookworm (minbase)"
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
mkdir -p "$cache/debs"                      # kept across builds: a rebuild downloads little
run debootstrap --variant=minbase --cache-dir="$cache/debs" bookworm "$root" "$mirror"
cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"  # same mirrors, incl. security
rm -f "$root/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"              # start no services
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
mount --bind "$cache/debs" "$root/var/cache/apt/archives"

step "apt-get install"
run in_root apt-get update -q
# libcap2/libffi8: python-prctl's and cffi's compiled modules; libseccomp2: pyseccomp;
# qemu-system-x86: a reference VMM inside L1; kmod: modprobe of the modules copied below;
# strace: `stratovirt seccomp usage` records what each role calls (scripts/seccomp_usage.py).
# liburing2: the host-built vmm/_virtq links it (O_DIRECT disks' io_uring engine); named
# here rather than left to qemu-system-x86's dependencies.
run in_root apt-get install -y -q --no-install-recommends python3 python3-venv libcap2 \
    libffi8 libseccomp2 liburing2 qemu-system-x86 iproute2 busybox e2fsprogs kmod strace
umount "$root/var/cache/apt/archives"
rm -rf "$root"/var/lib/apt/lists/*

step "kernel modules $kver"
mkdir -p "$root/lib/modules"
cp -a "$work/kernel/lib/modules/$kver" "$root/lib/modules/"
run in_root depmod "$kver"

step "venv /opt/vmm with the runtime dependencies (wheels built on the host)"
# The host's /usr/bin/python3 is bookworm's 3.11.2, so its wheels fit L1.
mapfile -t dep_list <<<"$deps"
run /usr/bin/python3 -m pip wheel -q --disable-pip-version-check -w "$root/tmp/wheels" "${dep_list[@]}"
run in_root python3 -m venv /opt/vmm
run in_root /opt/vmm/bin/pip install -q --disable-pip-version-check --no-index \
    --find-links /tmp/wheels "${dep_list[@]}"
run in_root /opt/vmm/bin/python -c 'import cffi, click, msgpack, prctl, pyseccomp'
rm -rf "$root/tmp/wheels" "$root/root/.cache"
umount "$root/proc"

# PID 1 after switch_root: mount the basics and the per-run payload disk (label "payload"),
# then hand over to the payload's init.sh, which tests/framework/nested.py writes.
cat > "$root/sbin/l1-init" <<'INIT'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc; mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
ip link set lo up
hostname l1
mkdir -p /payload
if mount -L payload /payload && [ -f /payload/init.sh ]; then
    exec sh /payload/init.sh
fi
echo "NESTED-SETUP-FAILED: no payload disk"; cat /proc/partitions
sync; busybox poweroff -f
INIT
chmod 755 "$root/sbin/l1-init"

step "initramfs"
ird=$work/initramfs
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$ird/bin/busybox"          # busybox-static: the initramfs has no libraries
virtio="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
for m in $virtio; do
    cp "$(find "$work/kernel/lib/modules/$kver" -name "$m.ko" | head -n 1)" "$ird/lib/modules/"
done
cat > "$ird/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $virtio; do insmod /lib/modules/\$m.ko || echo "l1-initramfs: insmod \$m failed"; done
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 200 ]; do sleep 0.05; i=\$((i+1)); done
if ! mount -t ext4 /dev/vda /newroot; then
    echo "NESTED-SETUP-FAILED: cannot mount the L1 root"; cat /proc/partitions; poweroff -f
fi
umount /sys /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/l1-init
INIT
chmod 755 "$ird/init"
mkdir -p "$work/out"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/out/initrd.img"
cp "$work"/kernel/boot/vmlinuz-* "$work/out/vmlinuz"

step "ext4 image ($(du -sh "$root" | cut -f1) of files)"
truncate -s 3G "$work/out/l1.img"           # sparse: only the files take space
run mkfs.ext4 -q -F -L l1root -d "$root" "$work/out/l1.img"
printf 'kernel=%s\ndependencies=%s\nbuilt=%s\n' "$kernel_package" "$(echo $deps)" "$(date -Is)" \
    > "$work/out/info"
cp "$log" "$work/out/build.log"

mv "$work/out" "$out"                        # the build counts only from here
for old in "$cache"/l1-*; do [ "$old" = "$out" ] || rm -rf --one-file-system "$old"; done
step "done: $out"
echo "$out"
