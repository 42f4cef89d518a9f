"""Runs inside L1: virtio-console (hvc0) and vsock through our backend processes, with
Debian's stock kernel as L2 and its own drivers; guest/vsock-io is the guest's vsock
tool. One L2 boot carries every data check; configuration mistakes are checked
without booting. Prints `CHECK <name> <json>` lines for
tests/nested/test_console_vsock.py to judge.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

from console import Timeout, Vm

DIR = "/tmp/cv"
API = f"{DIR}/api.sock"
CONSOLE = f"{DIR}/con.sock"
VSOCK = f"{DIR}/vs0.vsock"          # <api-channel's directory>/<vsock id>.vsock
CID = 3
BOUND = 64 << 10


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def shell(vm: Vm, command: str, marker: str) -> tuple[str, int]:
    """Run `command` in the guest; (its output, its status)."""
    vm.send(f"{command}; echo {marker}-$?\n")
    match = vm.expect(rf"(?s)(.*?)^{marker}-(\d+)$")
    return match[1], int(match[2])


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_in(text: str) -> list[str]:
    import re
    return re.findall(r"\b[0-9a-f]{32}\b", text)


def client(timeout: float = 120) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(CONSOLE)
    sock.settimeout(timeout)
    return sock


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def quiet_for(sock: socket.socket, seconds: float) -> bytes:
    """What arrives within `seconds` (nothing, when all was delivered)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except socket.timeout:
        return b""
    finally:
        sock.settimeout(120)


def console_checks(vm: Vm) -> None:
    # Guest output with no client: 100 KiB after a marker; the newest 64 KiB are kept.
    # hvc resets a tty's settings whenever nothing holds it open: the shell keeps fd 3
    # on it, so every later `> /dev/hvc0` writes raw bytes (no \n -> \r\n).
    shell(vm, "exec 3<>/dev/hvc0; busybox stty -F /dev/hvc0 raw -echo", "RAW")
    shell(vm, "dd if=/dev/urandom of=/big bs=1024 count=100 2>/dev/null", "BIG")
    tail = md5_in(shell(vm, "busybox tail -c 65536 /big | md5sum", "TAIL")[0])
    shell(vm, "echo early-marker > /dev/hvc0; cat /big > /dev/hvc0", "EARLY")
    first = client()
    kept = recv_exactly(first, BOUND)
    extra = quiet_for(first, 2)
    report("console_kept", kept=len(kept), md5=md5(kept), guest_tail_md5=tail,
           extra=len(extra))

    # Both ways while connected, with checksums.
    shell(vm, "dd if=/dev/urandom of=/out bs=1024 count=256 2>/dev/null", "OUT")
    out_md5 = md5_in(shell(vm, "md5sum /out", "OUTSUM")[0])
    vm.send("cat /out > /dev/hvc0\n")
    got = recv_exactly(first, 256 << 10)
    data_in = os.urandom(200_000)
    vm.send("busybox head -c 200000 /dev/hvc0 > /in &\n")
    time.sleep(2)
    first.sendall(data_in)
    in_text, in_status = shell(vm, "wait; md5sum /in", "INSUM")
    report("console_both_ways", out_guest=out_md5, out_host=md5(got), out_len=len(got),
           in_host=md5(data_in), in_guest=md5_in(in_text), in_status=in_status)

    # A second client is refused with a message; the first goes on.
    second = client(30)
    refusal = second.recv(200)
    closed = second.recv(200) == b""
    shell(vm, "echo still-first > /dev/hvc0", "STILL")
    still = recv_exactly(first, len(b"still-first\n"))
    report("console_second", refusal=refusal.decode(errors="replace"), closed=closed,
           first=still.decode(errors="replace"))

    # What the guest writes while nobody is connected is there for the next client.
    first.close()
    time.sleep(1)
    shell(vm, "echo written-while-away > /dev/hvc0", "AWAY")
    third = client()
    away = recv_exactly(third, len(b"written-while-away\n"))
    third.close()
    report("console_reconnect", got=away.decode(errors="replace"))


def host_server(port: int, found: dict) -> threading.Thread:
    """<vsock socket>_<port>: read one stream to its end, answer its md5."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{VSOCK}_{port}")
    listener.listen(4)
    listener.settimeout(300)

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(300)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            found[port] = md5(b"".join(chunks))
            conn.sendall(found[port].encode() + b"\n")
            conn.close()
        finally:
            listener.close()
            os.unlink(f"{VSOCK}_{port}")        # ours: the VMM leaves nothing, nor do we

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def host_client(port: int, payload: bytes, found: dict) -> threading.Thread:
    def run():
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(VSOCK)
        sock.settimeout(300)
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                break
            line += byte
        found[port] = line.decode(errors="replace")
        if line.startswith(b"OK "):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def vsock_checks(vm: Vm) -> None:
    # Guest -> host: three streams at once, each answered with the md5 the host saw.
    seen: dict = {}
    servers = [host_server(5000 + i, seen) for i in range(3)]
    shell(vm, "for i in 0 1 2; do dd if=/dev/urandom of=/p$i bs=65536 count=$((4 + 2 * i)) "
              "2>/dev/null; done", "MADE")
    sent = md5_in(shell(vm, "md5sum /p0 /p1 /p2", "SUMS")[0])
    text, status = shell(vm, "for i in 0 1 2; do vsock-io connect 2 $((5000 + i)) < /p$i "
                             "> /r$i & done; wait; cat /r0 /r1 /r2", "SENT")
    for server in servers:
        server.join(120)
    report("vsock_guest_to_host", sent=sent, host=[seen.get(5000 + i) for i in range(3)],
           replies=md5_in(text), status=status)

    # Host -> guest: two streams at once; the guest prints the md5 of what came.
    shell(vm, "for i in 0 1; do vsock-io listen $((6000 + i)) < /dev/null > /q$i & done",
          "LISTENING")
    time.sleep(2)
    payloads = [os.urandom(400_000 + i) for i in range(2)]
    oks: dict = {}
    clients = [host_client(6000 + i, payloads[i], oks) for i in range(2)]
    for thread in clients:
        thread.join(300)
    text, status = shell(vm, "wait; md5sum /q0 /q1", "RECEIVED")
    report("vsock_host_to_guest", host=[md5(p) for p in payloads], guest=md5_in(text),
           oks=[oks.get(6000 + i) for i in range(2)], status=status)

    # Refusals both ways: nobody on the host's port, nobody on the guest's port.
    text, status = shell(vm, "vsock-io connect 2 5999 < /dev/null", "REFUSED")
    refused: dict = {}
    host_client(7000, b"", refused).join(120)
    report("vsock_refused", guest_status=status, guest_text=text.strip()[-120:],
           host_line=refused.get(7000))


def data_run() -> None:
    os.makedirs(DIR, exist_ok=True)
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", "console=ttyS0 reboot=k panic=1 quiet", "-smp", "2",
             "-api-channel", f"unix:{API}", "-chardev", f"id=con0,path={CONSOLE}",
             "-device", f"vsock,id=vs0,guest-cid={CID}", "-serial", "stdio", "-D",
             "/tmp/cv.log"], timeout=900)
    try:
        vm.expect("initramfs: ready")
        processes = []
        for entry in os.listdir("/proc"):
            try:
                processes.append(open(f"/proc/{entry}/comm").read().strip())
            except OSError:
                pass
        modes = {path: oct(os.stat(path).st_mode & 0o777) for path in (CONSOLE, VSOCK)}
        report("processes", names=sorted(p for p in processes if p.startswith("vmm-")),
               modes=modes)
        for check in (console_checks, vsock_checks):
            try:
                check(vm)
            except (Timeout, OSError) as error:
                print("CHECK-FAILED", check.__name__, repr(error), flush=True)
        vm.send("reboot -f\n")
        status = vm.wait()
        log = open("/tmp/cv.log").read() if os.path.exists("/tmp/cv.log") else ""
        report("ended", status=status, left=sorted(os.listdir(DIR)),
               violations=[line for line in log.splitlines() if "seccomp violation" in line],
               errors=[line for line in log.splitlines() if " :ERROR: " in line][-5:])
    finally:
        vm.kill()


def bad_input() -> None:
    """Configuration mistakes: one line, exit status 2, nothing created."""
    os.makedirs("/tmp/bad", exist_ok=True)
    open("/tmp/bad/con.sock", "w").close()
    base = ["stratovirt", "-kernel", "/l2/vmlinuz", "-api-channel", "unix:/tmp/bad/api.sock"]
    results = {}
    for name, extra in (("console_exists", ["-chardev", "id=c,path=/tmp/bad/con.sock"]),
                        ("cid_2", ["-device", "vsock,id=v,guest-cid=2"]),
                        ("cid_0", ["-device", "vsock,id=v,guest-cid=0"])):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        results[name] = {"status": proc.returncode, "stderr": proc.stderr,
                         "left": sorted(os.listdir("/tmp/bad"))}
    report("bad_input", **results)


if __name__ == "__main__":
    failed = 0
    for run in (bad_input, data_run):
        try:
            run()
        except (Timeout, OSError, subprocess.SubprocessError) as error:
            print("CHECK-FAILED", run.__name__, repr(error), flush=True)
            failed += 1
    sys.exit(failed)
