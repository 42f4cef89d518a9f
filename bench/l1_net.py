"""Runs inside L1 for bench/net.py: TCP throughput between an L2 guest (Debian's stock
kernel, busybox nc) and L1 over one tap, with the NIC served either by our stratovirt
(vhost-user backend process) or by QEMU's own userspace virtio-net (`-netdev tap`,
vhost=off), alternating, the same kernel, initramfs, vCPUs and memory. Prints one
`RESULT <json>` line per transfer.

    python3 l1_net.py ROUNDS MIB
"""

import json
import socket
import subprocess
import sys
import time

from console import Vm

HOST, GUEST = "10.0.0.1", "10.0.0.2"
MAC = "0e:00:00:00:00:02"
APPEND = "console=ttyS0 reboot=k panic=1 quiet"


def ours() -> list[str]:
    return ["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
            "-append", APPEND, "-smp", "2", "-m", "512M", "-serial", "stdio",
            "-api-channel", "unix:/tmp/bench.sock", "-netdev", f"id=net0,netdev=tap0,mac={MAC}"]


def qemu() -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm", "-cpu", "host", "-smp", "2",
            "-m", "512M", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img", "-append", APPEND,
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-device,netdev=n0,mac={MAC}", "-no-reboot"]


def shell(vm: Vm, command: str, marker: str) -> int:
    vm.send(f"{command}; echo {marker}-$?\n")
    return int(vm.expect(rf"^{marker}-(\d+)$")[1])


def guest_to_host(vm: Vm, port: int, mib: int) -> float:
    """Seconds from accepting the guest's connection to its end of stream."""
    with socket.create_server((HOST, port)) as listener:
        vm.send(f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null | nc {HOST} {port}; "
                f"echo OUT-$?\n")
        connection, _ = listener.accept()
        start = time.monotonic()
        received = 0
        with connection:
            while chunk := connection.recv(1 << 18):
                received += len(chunk)
        elapsed = time.monotonic() - start
    vm.expect(r"^OUT-0$")
    assert received == mib << 20, received
    return elapsed


def host_to_guest(vm: Vm, port: int, mib: int) -> float:
    """Seconds from accepting until the guest has read everything and closed."""
    data = bytes(1 << 20)
    with socket.create_server((HOST, port)) as listener:
        vm.send(f"nc {HOST} {port} < /dev/null > /dev/null; echo IN-$?\n")
        connection, _ = listener.accept()
        start = time.monotonic()
        with connection:
            for _ in range(mib):
                connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
            while connection.recv(1 << 16):
                pass
        elapsed = time.monotonic() - start
    vm.expect(r"^IN-0$")
    return elapsed


def one_round(name: str, argv: list[str], round_: int, mib: int) -> None:
    vm = Vm(argv, timeout=900)
    try:
        vm.expect("initramfs: ready")
        assert shell(vm, f"ip link set eth0 up && ip addr add {GUEST}/24 dev eth0", "UP") == 0
        assert shell(vm, f"ping -c 2 -W 10 {HOST}", "PING") == 0
        for direction, measure in (("guest_to_host", guest_to_host),
                                   ("host_to_guest", host_to_guest)):
            seconds = measure(vm, 7000 + round_ * 2 + (direction == "host_to_guest"), mib)
            print("RESULT", json.dumps({"vmm": name, "round": round_, "direction": direction,
                                        "mib": mib, "seconds": seconds}), flush=True)
        vm.send("poweroff -f\n")
        vm.wait()
    finally:
        vm.kill()


if __name__ == "__main__":
    rounds, mib = int(sys.argv[1]), int(sys.argv[2])
    subprocess.run(["modprobe", "tun"], check=False)
    subprocess.run(["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
    subprocess.run(["ip", "addr", "add", f"{HOST}/24", "dev", "tap0"], check=True)
    subprocess.run(["ip", "link", "set", "tap0", "up"], check=True)
    for round_ in range(rounds):
        order = [("ours", ours()), ("qemu", qemu())]
        if round_ % 2:
            order.reverse()                  # interleaved, each side first half the time
        for name, argv in order:
            one_round(name, argv, round_, mib)
