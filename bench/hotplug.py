"""Disk hot-plug as the guest sees it, and the vCPU's progress while QMP is flooded: our
stratovirt on this host's /dev/kvm with the tiny guest in `watch` mode.

    .venv/bin/python bench/hotplug.py [--rounds N] [--flood-rounds M] [--window S]
                                      [--in-flight W]

The guest (guest/tiny.S, `watch`) polls disk slot 1's capacity with an MMIO read (one
exit to our vm process per poll) and prints `+` when a disk appears there, `-` when it
goes, and a `.` every 10000 polls. A thread of this script reads the VM's serial output
(stdout) all the time and stamps each chunk with the time it arrived
(tests/framework/serial_log.py).

1. Plug/unplug latency, N rounds (default 20) into addr 0x1 over qemu.qmp (the same
   disk, blockdev-add'ed once):
   - device_add -> `+`: from just before device_add is sent to the arrival of the `+`.
     This is what a management stack waits for: the broker forking the backend, the
     vhost-user set-up, the slot swap, then the guest's next poll seeing the new
     capacity and its `+` crossing the UART to our stdout. The reply's own round trip
     is shown too.
   - device_del -> DEVICE_DELETED: from just before device_del is sent to the event
     reaching the client (the server emits it before the reply).
   - device_del -> `-`: to the guest seeing the capacity back at 0.
   The guest's own share is small: a poll every ~15 us, and a byte on the UART is two
   port exits.
2. vCPU progress under a QMP flood: `.` ticks per second of guest output, in windows of
   S seconds (default 3) that start and end on a tick (the tick intervals it holds over
   their exact wall time: no rounding to whole ticks, which matters at one tick a
   second), for M rounds (default 5) of four interleaved windows, the order rotating
   each round: idle (a client connected and negotiated, sending nothing), a flood of
   query-status, a flood of malformed JSON (trailing commas, bare words, 1e999, invalid
   UTF-8, bytes outside any message: each gets one error reply), and a control (below).
   The flooder is a separate process on a raw socket keeping W commands (default 32)
   in flight, refilling as each reply arrives, so the QMP thread always has work but
   the backlog at the end of a window is small. The ratio flood/idle is what a noisy
   API client costs the guest: the QMP thread and the vCPU thread share the vm
   process's interpreter (the GIL), and on this 2-core machine the flooder, the QMP
   thread and the vCPU compete for cores as well. The control window separates the
   two: no QMP traffic, but two busy-looping host processes (as many runnable threads
   as the flooder and the QMP thread add), the cores' share alone.

Timings here vary by about 20% from run to run: medians are reported, and the flood
windows are interleaved with idle ones. No QEMU figure: QEMU's microvm has no hot-plug.
"""

import argparse
import asyncio
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework.guest import tiny_guest  # noqa: E402
from tests.framework.serial_log import SerialLog  # noqa: E402

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
DISK_BYTES = 1 << 20
SETTLE_SECONDS = 0.5          # after a flood starts or stops, before a window opens
MALFORMED = [b'{"execute": "query-status",}\r\n', b'{"execute": query-status}\r\n',
             b'{"execute": 1e999}\r\n', b'{"execute": "\xff\xfe"}\r\n', b'nonsense\r\n']
STATUS = [b'{"execute": "query-status"}\r\n']
FLOODS = {"query-status": STATUS, "malformed JSON": MALFORMED}
CONTROL = "control"
BURNERS = 2                   # busy host processes in the control window


# The flooder: `hotplug.py --flood-worker SOCKET`, driven line by line on stdin
# ("go MODE", "stop", "quit"); it answers "ready" and, after each stop,
# "<replies> <errors> <seconds>".

def flood_worker(path: str, in_flight: int) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    pending = bytearray()

    def read_line() -> bytes:
        while b"\n" not in pending:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the QMP server closed the connection")
            pending.extend(data)
        line, _, rest = bytes(pending).partition(b"\n")
        pending[:] = rest
        return line

    read_line()                                        # the greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\r\n')
    assert b'"return"' in read_line()
    print("ready", flush=True)
    stdin = sys.stdin.buffer.raw        # unbuffered: select() on it sees every line
    for command in iter(stdin.readline, b""):
        words = command.split()
        if words[0] == b"quit":
            return
        messages = FLOODS[b" ".join(words[1:]).decode()]
        start, sent, replies, errors, stopping = time.monotonic(), 0, 0, 0, False
        for _ in range(in_flight):
            sock.sendall(messages[sent % len(messages)])
            sent += 1
        while replies < sent:
            ready, _, _ = select.select([sock, stdin] if not stopping else [sock], [], [])
            if stdin in ready:
                assert stdin.readline().strip() == b"stop"
                stopping = True
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("the QMP server closed the connection")
                pending.extend(data)
                lines = bytes(pending).split(b"\n")
                pending[:] = lines.pop()
                replies += len(lines)
                errors += sum(b'"error"' in line for line in lines)
                if not stopping:
                    for _ in lines:
                        sock.sendall(messages[sent % len(messages)])
                        sent += 1
        print(f"{replies} {errors} {time.monotonic() - start:.3f}", flush=True)


class Flooder:
    def __init__(self, api: Path, in_flight: int):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--flood-worker", str(api), "--in-flight",
             str(in_flight)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def tell(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self) -> tuple[int, int, float]:
        self.tell("stop")
        replies, errors, seconds = self.process.stdout.readline().split()
        return int(replies), int(errors), float(seconds)

    def close(self) -> None:
        self.tell("quit")
        self.process.wait(10)


# The VM.

def start_vm(kernel: Path, workdir: Path) -> tuple[subprocess.Popen, list[str], SerialLog]:
    api = workdir / "api.sock"
    argv = [str(VENV_PYTHON), "-m", "vmm", "-kernel", str(kernel), "-append", "watch",
            "-m", "128M", "-api-channel", f"unix:{api}", "-serial", "stdio"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=workdir)
    serial = SerialLog(process.stdout)
    serial.wait_for(b"\n", timeout=30)          # the banner: marks come after it
    serial.wait_for(b".", serial.mark(), timeout=30)
    return process, argv, serial


async def plug_rounds(api: Path, serial: SerialLog, image: Path, rounds: int) -> dict:
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench")
    await qmp.connect(str(api))
    deleted: list[float] = []

    async def collect():
        async for event in qmp.events:
            if event["event"] == "DEVICE_DELETED":
                deleted.append(time.monotonic())

    collector = asyncio.create_task(collect())
    results = {key: [] for key in ("add_reply", "add_plus", "del_event", "del_reply",
                                   "del_minus")}
    try:
        await qmp.execute("blockdev-add", {
            "node-name": "hot", "file": {"driver": "file", "filename": str(image)},
            "cache": {"direct": False}})
        for _ in range(rounds):
            await asyncio.sleep(0.2)            # the guest back to plain polling
            mark = serial.mark()
            start = time.monotonic()
            await qmp.execute("device_add", {"id": "hot", "driver": "virtio-blk-mmio",
                                             "addr": "0x1"})
            results["add_reply"].append(time.monotonic() - start)
            plus, _ = await asyncio.to_thread(serial.wait_for, b"+", mark)
            results["add_plus"].append(plus - start)

            await asyncio.sleep(0.2)
            mark, events = serial.mark(), len(deleted)
            start = time.monotonic()
            await qmp.execute("device_del", {"id": "hot"})
            results["del_reply"].append(time.monotonic() - start)
            minus, _ = await asyncio.to_thread(serial.wait_for, b"-", mark)
            while len(deleted) == events:
                await asyncio.sleep(0.001)
            results["del_event"].append(deleted[events] - start)
            results["del_minus"].append(minus - start)
        await qmp.execute("blockdev-del", {"node-name": "hot"})
    finally:
        collector.cancel()
        await qmp.disconnect()
    return results


def flood_rounds(api: Path, serial: SerialLog, rounds: int, window: float,
                 in_flight: int) -> dict:
    kinds = ["idle", *FLOODS, CONTROL]
    ticks = {kind: [] for kind in kinds}
    rates = {kind: [] for kind in FLOODS}
    flooder = Flooder(api, in_flight)
    try:
        for index in range(rounds):
            order = kinds[index % len(kinds):] + kinds[:index % len(kinds)]
            for kind in order:
                burners = []
                if kind == CONTROL:
                    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                               for _ in range(BURNERS)]
                elif kind != "idle":
                    flooder.tell(f"go {kind}")
                time.sleep(SETTLE_SECONDS)
                # The window runs from a tick to the first tick `window` seconds later:
                # whole tick intervals over their exact wall time.
                since, first = serial.wait_for(b".", serial.mark())
                time.sleep(max(0.0, since + window - time.monotonic()))
                until, last = serial.wait_for(b".", serial.mark())
                ticks[kind].append(serial.count(b".", first + 1, last + 1) / (until - since))
                for burner in burners:
                    burner.kill()
                    burner.wait()
                if kind in FLOODS:
                    replies, errors, seconds = flooder.stop()
                    if kind == "malformed JSON" and errors != replies:
                        raise RuntimeError(f"malformed flood: {replies - errors} of "
                                           f"{replies} replies were not errors")
                    rates[kind].append(replies / seconds)
                    time.sleep(SETTLE_SECONDS)  # the backlog drained before the next
    finally:
        flooder.close()
    return {"ticks": ticks, "rates": rates}


def quit_vm(api: Path, process: subprocess.Popen) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(api))
        sock.recv(4096)
        sock.sendall(b'{"execute": "qmp_capabilities"}\r\n{"execute": "quit"}\r\n')
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="plug/unplug rounds")
    parser.add_argument("--flood-rounds", type=int, default=5,
                        help="rounds of (idle, query-status, malformed, control) windows")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--in-flight", type=int, default=32,
                        help="commands the flooder keeps in flight")
    parser.add_argument("--flood-worker", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_worker:
        flood_worker(args.flood_worker, args.in_flight)
        return

    kernel = tiny_guest()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as top:
        workdir = Path(top)
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES)
        (workdir / "vm").mkdir()
        api = workdir / "vm" / "api.sock"
        process, argv, serial = start_vm(kernel, workdir / "vm")
        try:
            plug = asyncio.run(plug_rounds(api, serial, image, args.rounds))
            flood = flood_rounds(api, serial, args.flood_rounds, args.window, args.in_flight)
        finally:
            quit_vm(api, process)
        err = process.stderr.read().decode(errors="replace").strip()
        if process.returncode != 0 or err:
            print(f"the VM exited with {process.returncode}; stderr: {err}", file=sys.stderr)

    def ms(values):
        return (f"{statistics.median(values) * 1000:8.1f} "
                f"[{min(values) * 1000:.1f} .. {max(values) * 1000:.1f}]")

    print("bench: " + " ".join([".venv/bin/python", "bench/hotplug.py", *sys.argv[1:]]))
    print("vm:    " + " ".join(argv))
    print(f"host:  {os.cpu_count()} CPUs, 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after (ours adds ~1-2); guest: tiny.elf `watch` "
          "(64-bit entry)")
    print()
    print(f"plug/unplug, {args.rounds} rounds into addr 0x1: median [min .. max], ms")
    print(f"  device_add -> reply            {ms(plug['add_reply'])}")
    print(f"  device_add -> '+' on serial    {ms(plug['add_plus'])}")
    print(f"  device_del -> DEVICE_DELETED   {ms(plug['del_event'])}")
    print(f"  device_del -> reply            {ms(plug['del_reply'])}")
    print(f"  device_del -> '-' on serial    {ms(plug['del_minus'])}")
    print()
    ticks, rates = flood["ticks"], flood["rates"]
    idle = statistics.median(ticks["idle"])
    print(f"vCPU progress: '.' ticks/s (10000 polls each), {args.flood_rounds} rounds of "
          f"{args.window:g} s windows, interleaved; median [min .. max]")
    print(f"  {'window':<30}{'ticks/s':>8}  {'range':<14}{'ratio':>6}  commands/s")
    for kind in ticks:
        values = ticks[kind]
        median = statistics.median(values)
        rate = f"{statistics.median(rates[kind]):10.0f}" if kind in rates else f"{'-':>10}"
        label = {"idle": "idle (connected, quiet)",
                 CONTROL: f"idle + {BURNERS} busy host procs"}.get(kind, f"flood: {kind}")
        print(f"  {label:<30}{median:8.2f}  {min(values):5.2f} .. {max(values):<5.2f} "
              f"{median / idle:6.2f}  {rate}")
    per_round = {kind: statistics.median(f / i for f, i in zip(ticks[kind], ticks["idle"]))
                 for kind in [*FLOODS, CONTROL]}
    print("  ratio of each flood window to its round's idle one, median: " +
          ", ".join(f"{kind} {value:.2f}" for kind, value in per_round.items()))


if __name__ == "__main__":
    main()
