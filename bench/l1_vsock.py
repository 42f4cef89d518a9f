"""Runs inside L1 for bench/vsock.py: vsock stream throughput between an L2 guest
(Debian's stock kernel, guest/vsock-io) and L1, alternating between
- ours:        our stratovirt, its vsock backend process (vmm-vsock-<id>), host side
               on unix sockets (the hybrid convention);
- qemu-user:   QEMU (microvm, KVM) with `vhost-user-vsock-device` and our backend as a
               program (stratovirt-vhost-user-vsock): the same backend behind QEMU's
               frontend and transport;
- qemu-kernel: QEMU with `vhost-vsock-device`, the host kernel's vhost_vsock, host side
               on AF_VSOCK sockets (skipped when L1 has no /dev/vhost-vsock).
Same kernel, initramfs, 2 vCPUs, 512 MiB. Prints one `RESULT <json>` line per transfer.

    python3 l1_vsock.py ROUNDS MIB
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from console import Vm

APPEND = "console=ttyS0 reboot=k panic=1 quiet"
CID = 3
DIR = "/tmp/vb"
UDS = f"{DIR}/vs0.vsock"


def ours() -> tuple[list[str], None]:
    return (["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", APPEND, "-smp", "2", "-m", "512M", "-serial", "stdio",
             "-api-channel", f"unix:{DIR}/api.sock", "-device", f"vsock,id=vs0,guest-cid={CID}"],
            None)


def qemu(device: list[str], memfd: bool) -> list[str]:
    memory = ["-object", "memory-backend-memfd,id=mem,size=512M,share=on",
              "-M", "microvm,accel=kvm,memory-backend=mem"] if memfd else \
        ["-M", "microvm,accel=kvm"]
    return ["qemu-system-x86_64", *memory, "-cpu", "host", "-smp", "2", "-m", "512M",
            "-global", "virtio-mmio.force-legacy=false",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img", "-append", APPEND,
            *device, "-no-reboot"]


def qemu_user() -> tuple[list[str], subprocess.Popen]:
    vhost = f"{DIR}/vhost.sock"
    backend = subprocess.Popen(["stratovirt-vhost-user-vsock", "--socket-path", vhost,
                                "--guest-cid", str(CID), "--uds-path", UDS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(vhost):
        assert backend.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return qemu(["-chardev", f"socket,id=c0,path={vhost}",
                 "-device", "vhost-user-vsock-device,chardev=c0"], True), backend


def qemu_kernel() -> tuple[list[str], None]:
    return qemu(["-device", f"vhost-vsock-device,guest-cid={CID}"], False), None


def shell(vm: Vm, command: str, marker: str) -> int:
    vm.send(f"{command}; echo {marker}-$?\n")
    return int(vm.expect(rf"^{marker}-(\d+)$")[1])


def host_listener(kernel: bool, port: int) -> socket.socket:
    if kernel:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, port))
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{UDS}_{port}")
    listener.listen(1)
    listener.settimeout(600)
    return listener


def host_connect(kernel: bool, port: int) -> socket.socket:
    if kernel:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(600)
        sock.connect((CID, port))
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(600)
    sock.connect(UDS)
    sock.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, f"no OK for port {port}"
        line += byte
    assert line.startswith(b"OK "), line
    return sock


def guest_to_host(vm: Vm, kernel: bool, port: int, mib: int) -> float:
    """Seconds from accepting the guest's stream to its end."""
    listener = host_listener(kernel, port)
    try:
        vm.send(f"vsock-io source 2 {port} {mib << 20} > /dev/null; echo OUT-$?\n")
        connection, _ = listener.accept()
        start = time.monotonic()
        received = 0
        with connection:
            while chunk := connection.recv(1 << 18):
                received += len(chunk)
        elapsed = time.monotonic() - start
    finally:
        listener.close()
        if not kernel:
            os.unlink(f"{UDS}_{port}")
    vm.expect(r"^OUT-0$")
    assert received == mib << 20, received
    return elapsed


def host_to_guest(vm: Vm, kernel: bool, port: int, mib: int) -> float:
    """Seconds from the stream's start until the guest has read it all (its count)."""
    assert shell(vm, f"vsock-io sink {port} > /dev/null & true", "SINK") == 0
    time.sleep(1)
    data = bytes(1 << 20)
    sock = host_connect(kernel, port)
    start = time.monotonic()
    with sock:
        for _ in range(mib):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    elapsed = time.monotonic() - start
    assert answer.strip() == str(mib << 20).encode(), answer
    return elapsed


def one_round(name: str, setup, round_: int, mib: int) -> None:
    os.makedirs(DIR, exist_ok=True)
    argv, backend = setup()
    vm = Vm(argv, timeout=1800)
    kernel = name == "qemu-kernel"
    try:
        vm.expect("initramfs: ready")
        for direction, measure in (("guest_to_host", guest_to_host),
                                   ("host_to_guest", host_to_guest)):
            port = 7000 + round_ * 2 + (direction == "host_to_guest")
            seconds = measure(vm, kernel, port, mib)
            print("RESULT", json.dumps({"vmm": name, "round": round_, "direction": direction,
                                        "mib": mib, "seconds": seconds}), flush=True)
        vm.send("poweroff -f\n")
        vm.wait()
    finally:
        vm.kill()
        if backend is not None:
            backend.terminate()
            backend.wait(30)
        shutil.rmtree(DIR, ignore_errors=True)


if __name__ == "__main__":
    rounds, mib = int(sys.argv[1]), int(sys.argv[2])
    setups = [("ours", ours), ("qemu-user", qemu_user)]
    if subprocess.run(["modprobe", "vhost_vsock"]).returncode == 0 and \
            os.path.exists("/dev/vhost-vsock"):
        setups.append(("qemu-kernel", qemu_kernel))
    else:
        print("NOTE no /dev/vhost-vsock in L1: qemu-kernel skipped", flush=True)
    for round_ in range(rounds):
        order = setups[round_ % len(setups):] + setups[:round_ % len(setups)]
        for name, setup in order:
            one_round(name, setup, round_, mib)
