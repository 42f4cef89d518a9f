"""vhost-user-blk backends driven from the host (no guest): ours against
qemu-storage-daemon on the same file, interleaved, medians and ratios.

    .venv/bin/python bench/blk.py [--seconds S] [--rounds N]

The driver (tests/framework/virtio_driver.py) plays the guest in Python: it keeps QD
requests in flight, kicks, waits on the call eventfd. Its own cost per request is part
of every figure and the same for both backends; at high IOPS it, not the backend, can
be the limit, so CPU per I/O (the backend's utime+stime per completed request, from
/proc) is the fairer comparison.
"""

import argparse
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework.virtio_driver import DATA_GPA, Driver  # noqa: E402
from vmm.vhost_user.protocol import Connection  # noqa: E402

DISK_BYTES = 256 << 20
VERSION_1 = 1 << 32
WORKLOADS = [("randread 4k QD1", 0, 4096, 1, True), ("randread 4k QD32", 0, 4096, 32, True),
             ("randwrite 4k QD1", 1, 4096, 1, True), ("randwrite 4k QD32", 1, 4096, 32, True),
             ("read 128k QD1", 0, 128 << 10, 1, False)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(kind: str, disk: str, sock: str) -> subprocess.Popen:
    if os.path.exists(sock):
        os.unlink(sock)
    if kind == "ours":
        argv = [str(ROOT / ".venv/bin/stratovirt-vhost-user-blk"), "--socket-path", sock,
                "--blk-file", disk]
    else:
        argv = ["qemu-storage-daemon", "--blockdev",
                f"driver=file,node-name=f,filename={disk}",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                            f"addr.path={sock},writable=on"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.01)
    return process


def run(kind: str, disk: str, workload, seconds: float) -> dict:
    name, op, size, depth, randomly = workload
    sock = f"{tempfile.gettempdir()}/bench-{kind}.sock"
    backend = start(kind, disk, sock)
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock)
    driver = Driver(Connection(client), num=256)
    try:
        driver.start(VERSION_1)
        slots = [(DATA_GPA + i * 0x10_0000, DATA_GPA + i * 0x10_0000 + size) for i in range(depth)]
        sectors = DISK_BYTES // 512 - size // 512
        position = 0
        in_flight, latencies = {}, []

        def submit(slot):
            nonlocal position
            header, status = slots[slot][0], slots[slot][1]
            sector = random.randrange(0, sectors, 8) if randomly else position
            position = (position + size // 512) % sectors
            driver.memory.write(header, struct.pack("<IIQ", op, 0, sector))
            head = driver.submit([(header, 16, False), (header + 4096, size, op == 0),
                                  (status, 1, True)])
            in_flight[head] = (slot, time.perf_counter())

        cpu_before = cpu_seconds(backend.pid)
        started = time.perf_counter()
        for slot in range(depth):
            submit(slot)
        done = 0
        while time.perf_counter() - started < seconds:
            head, _ = driver.completion()
            slot, sent = in_flight.pop(head)
            latencies.append(time.perf_counter() - sent)
            done += 1
            submit(slot)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(backend.pid) - cpu_before
        latencies.sort()
        return {"iops": done / elapsed, "p50": latencies[len(latencies) // 2] * 1e6,
                "p99": latencies[int(len(latencies) * 0.99)] * 1e6, "cpu_us": cpu / done * 1e6}
    finally:
        client.close()
        driver.close()
        backend.terminate()
        backend.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as disk:
        disk.write(os.urandom(1 << 20) * (DISK_BYTES >> 20))
        disk.flush()
        print(f"{args.rounds} interleaved rounds of {args.seconds} s; medians; ours/qsd ratios")
        for workload in WORKLOADS:
            results = {"ours": [], "qsd": []}
            for _ in range(args.rounds):
                for kind in ("ours", "qsd"):
                    results[kind].append(run(kind, disk.name, workload, args.seconds))
            row = {k: {m: statistics.median(r[m] for r in v) for m in v[0]}
                   for k, v in results.items()}
            o, q = row["ours"], row["qsd"]
            print(f"{workload[0]:18} IOPS ours {o['iops']:8.0f} qsd {q['iops']:8.0f} "
                  f"({o['iops'] / q['iops']:.2f}) | p50 us {o['p50']:6.0f} {q['p50']:6.0f} | "
                  f"p99 us {o['p99']:6.0f} {q['p99']:6.0f} | CPU us/IO {o['cpu_us']:5.1f} "
                  f"{q['cpu_us']:5.1f} ({o['cpu_us'] / q['cpu_us']:.2f})")


if __name__ == "__main__":
    main()
