#!/usr/bin/env bash
# Builds a Linux guest from Debian's own packages into assets/ (not committed):
#   assets/vmlinuz       Debian's cloud kernel (bzImage)
#   assets/vmlinux       the same kernel as an ELF vmlinux, extracted from the bzImage
#   assets/initrd.img    busybox initramfs that loads the virtio modules (virtio-rng too: the
#                        hw_random core is built in, and so is /dev/hwrng) (and evdev and
#                        button, for the ACPI power button), then mounts root= (rw if
#                        asked) and switches to it, or else runs a shell
#   assets/rootfs.ext4   a small ext4 root filesystem with busybox; its acpid powers the
#                        guest off cleanly when the ACPI power button is pressed
# Safe to run again: it rebuilds only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=assets
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

kernel_package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$kernel_package" ]; then
    apt-get update -q
    kernel_package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi

# Assets built by an older version of this script are rebuilt (the kernel is kept).
# (tests/framework/assets.py computes the same stamp to know when to run this again)
stamp=$(cat "$0" guest/vsock-io.c | sha256sum | cut -c1-16)
if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -f "$out/initrd.img" "$out/rootfs.ext4"
fi

busybox=/bin/busybox
if [ ! -s "$out/vmlinuz" ] || [ ! -s "$out/initrd.img" ]; then
    chmod 755 "$work"  # apt-get download drops to the _apt user
    (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kernel_package")
    dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
    cp "$work"/k/boot/vmlinuz-* "$out/vmlinuz"
    # The ELF vmlinux below is extracted from this bzImage: an older one would not load
    # the initramfs's modules (another kernel's version magic).
    rm -f "$out/vmlinux"

    root="$work/initramfs"
    mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules}
    cp "$busybox" "$root/bin/busybox"
    # busybox has no AF_VSOCK tool: ours (guest/vsock-io.c), static.
    gcc -static -O2 -o "$root/bin/vsock-io" guest/vsock-io.c
    for tool in sh mount umount insmod mkdir cat echo ls poweroff reboot sync sleep dd md5sum \
            head grep switch_root ip ifconfig route ping nc wc cut; do
        ln -s busybox "$root/bin/$tool"
    done
    # Virtio is built as modules in the cloud kernel; this order satisfies their depends=.
    # evdev (/dev/input/event*) and button (the PNP0C0C power button, which the VMM's ACPI
    # GED notifies; docs/machine.md) are modules too, depending on nothing.
    modules="virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net
             virtio_console vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
             virtio-rng evdev button"
    for module in $modules; do
        found=$(find "$work/k/lib/modules" -name "$module.ko*" | head -n 1)
        if [ -n "$found" ]; then cp "$found" "$root/lib/modules/"; fi
    done
    cat > "$root/init" <<INIT
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(echo $modules); do
    for f in /lib/modules/\$m.ko*; do [ -e "\$f" ] && insmod "\$f"; done
done
echo "initramfs: ready"
# root=/dev/... as a distribution initramfs would: wait for the disk, mount it (rw
# only if the command line says rw), switch to it and run its /sbin/init.
root=; mode=ro
for word in \$(cat /proc/cmdline); do
    case "\$word" in
        root=/dev/*) root=\${word#root=} ;;
        rw) mode=rw ;;
        ro) mode=ro ;;
    esac
done
if [ -n "\$root" ]; then
    tries=0
    while [ ! -b "\$root" ] && [ \$tries -lt 100 ]; do sleep 0.1; tries=\$((tries + 1)); done
    if mount -t ext4 -o "\$mode" "\$root" /mnt; then
        echo "initramfs: switching to \$root (\$mode)"
        umount /sys /proc /dev
        exec switch_root /mnt /sbin/init
    fi
    echo "initramfs: cannot mount \$root"
fi
exec sh
INIT
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd.img"
fi

if [ ! -s "$out/vmlinux" ]; then
    # Debian compresses its kernel with LZ4 (legacy frame, magic 02 21 4c 18), as
    # the kernel's scripts/extract-vmlinux knows; lz4 exits 1 on the bzImage's trailer.
    offset=$(python3 -c 'import sys; print(open(sys.argv[1], "rb").read().find(bytes.fromhex("02214c18")))' "$out/vmlinuz")
    if [ "$offset" -lt 0 ]; then
        echo "guest-assets: no LZ4 stream in $out/vmlinuz" >&2
        exit 1
    fi
    tail -c +$((offset + 1)) "$out/vmlinuz" | lz4 -d -c > "$work/vmlinux" 2>/dev/null || true
    if [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
        echo "guest-assets: the extracted kernel is not an ELF file" >&2
        exit 1
    fi
    mv "$work/vmlinux" "$out/vmlinux"
fi

if [ ! -s "$out/rootfs.ext4" ]; then
    rootfs="$work/rootfs"
    mkdir -p "$rootfs"/{bin,sbin,etc,dev,proc,sys,tmp,root}
    cp "$busybox" "$rootfs/bin/busybox"
    for tool in sh mount umount ls cat echo sync poweroff reboot mkdir dd md5sum rm touch \
            grep head sleep uname cmp tr od acpid; do
        ln -s busybox "$rootfs/bin/$tool"
    done
    ln -s ../bin/busybox "$rootfs/sbin/init"
    printf 'root::0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
    # The power button: busybox acpid reads every /dev/input/event* and maps KEY_POWER to
    # the action PWRF/00000080, which it runs from its directory (/etc/acpi) as
    # ./PWRF/00000080: a program if that is a file, run-parts if a directory. poweroff
    # asks init (SIGUSR2) for its shutdown (::shutdown, then every process TERMed and
    # KILLed) and then the kernel's power-off: the ACPI S5 write that ends the VM.
    mkdir -p "$rootfs/etc/acpi/PWRF"
    printf '#!/bin/sh\nexec /bin/poweroff\n' > "$rootfs/etc/acpi/PWRF/00000080"
    chmod 755 "$rootfs/etc/acpi/PWRF/00000080"
    # busybox init: mount what a shell needs, start acpid (a daemon; its log, one line an
    # event, on the console: there is no /var/log), say so, then a shell on the console.
    cat > "$rootfs/etc/inittab" <<'INITTAB'
::sysinit:/bin/mount -t proc proc /proc
::sysinit:/bin/mount -t sysfs sysfs /sys
::sysinit:/bin/mount -t devtmpfs devtmpfs /dev
::sysinit:/bin/acpid -l /dev/console
::sysinit:/bin/echo "rootfs: ready"
::respawn:-/bin/sh
::shutdown:/bin/umount -a -r
INITTAB
    truncate -s 64M "$out/rootfs.ext4"
    mkfs.ext4 -q -F -d "$rootfs" "$out/rootfs.ext4"
fi
echo "$stamp" > "$out/.stamp"
echo "guest assets in $out/: $(cd "$out" && ls -d vmlinuz vmlinux initrd.img rootfs.ext4 | tr '\n' ' ')"
