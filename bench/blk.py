"""vhost-user-blk backends driven from the host (no guest): ours against
qemu-storage-daemon on the same file, interleaved, medians and ratios.

    .venv/bin/python bench/blk.py [--seconds S] [--rounds N] [--direct] [--only NAME]
                                  [--ours PROGRAM]

The driver (tests/framework/virtio_driver.py) plays the guest in Python, the way a
guest's block layer does: QD requests in flight, their descriptors written once; when
the call eventfd fires it reaps every completion there is and resubmits that batch with
one avail-index update and one kick. Latency runs from just before a request's header
is written to the moment its completion is reaped. The driver's own cost per request is
part of every figure and the same for both backends; on a small machine it, not the
backend, can be the limit, so CPU per I/O (the backend's utime+stime per completed
request, all threads, from /proc) is the fairer comparison.

--direct opens the file with O_DIRECT on both sides (ours --direct, qsd
cache.direct=on); --qsd-aio picks qsd's I/O engine (default: its thread pool); --ours
measures another build of our backend (a before/after).
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
HEADER = struct.Struct("<IIQ")
OURS = str(ROOT / ".venv/bin/stratovirt-vhost-user-blk")
VERSION_1 = 1 << 32
WORKLOADS = [("randread 4k QD1", 0, 4096, 1, True), ("randread 4k QD32", 0, 4096, 32, True),
             ("randwrite 4k QD1", 1, 4096, 1, True), ("randwrite 4k QD32", 1, 4096, 32, True),
             ("read 128k QD1", 0, 128 << 10, 1, False)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(kind: str, disk: str, sock: str, direct: bool, ours: str, aio: str) -> subprocess.Popen:
    if os.path.exists(sock):
        os.unlink(sock)
    if kind == "ours":
        argv = [ours, "--socket-path", sock, "--blk-file", disk] + (["--direct"] if direct else [])
    else:
        argv = ["qemu-storage-daemon", "--blockdev",
                f"driver=file,node-name=f,filename={disk},cache.direct={'on' if direct else 'off'},"
                f"aio={aio}",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                            f"addr.path={sock},writable=on"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.01)
    return process


def connect(client: socket.socket, path: str) -> None:
    """The socket file appears at bind(), a moment before listen(): retry."""
    for _ in range(500):
        try:
            client.connect(path)
            return
        except ConnectionRefusedError:
            time.sleep(0.01)
    client.connect(path)


def run(kind: str, disk: str, workload, seconds: float, direct: bool, ours: str,
        aio: str) -> dict:
    name, op, size, depth, randomly = workload
    sock = f"{tempfile.gettempdir()}/bench-{kind}.sock"
    backend = start(kind, disk, sock, direct, ours, aio)
    client = socket.socket(socket.AF_UNIX)
    try:
        connect(client, sock)
    except BaseException:
        backend.kill()
        backend.wait()
        raise
    driver = Driver(Connection(client), num=256)
    try:
        driver.start(VERSION_1)
        # Slot i: descriptors 3i..3i+2 (header, data, status), written once.
        headers = []
        for slot in range(depth):
            base = DATA_GPA + slot * 0x10_0000
            driver.write_chain(3 * slot, [(base, 16, False), (base + 4096, size, op == 0),
                                          (base + 16, 1, True)])
            headers.append(driver.offset(base, 16))
        sectors = DISK_BYTES // 512 - size // 512
        position = 0
        sent, latencies = [0.0] * depth, []
        view = driver.view

        def prepare(slot, now):
            nonlocal position
            sector = random.randrange(0, sectors, 8) if randomly else position
            position = (position + size // 512) % sectors
            HEADER.pack_into(view, headers[slot], op, 0, sector)
            sent[slot] = now
            return 3 * slot

        cpu_before = cpu_seconds(backend.pid)
        started = time.perf_counter()
        driver.post([prepare(slot, started) for slot in range(depth)])
        done = 0
        while True:
            completed = driver.reap()
            now = time.perf_counter()
            for head, _ in completed:
                latencies.append(now - sent[head // 3])
            done += len(completed)
            if now - started >= seconds:
                break
            # Resubmit the batch with one kick, as a guest's block layer would.
            driver.post([prepare(head // 3, now) for head, _ in completed])
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
    parser.add_argument("--direct", action="store_true",
                        help="O_DIRECT on both sides (ours --direct, qsd cache.direct=on)")
    parser.add_argument("--only", default="", help="run the workloads whose name contains this")
    parser.add_argument("--qsd-aio", default="threads", choices=["threads", "io_uring", "native"],
                        help="qsd's I/O engine (its default: a thread pool; native needs --direct)")
    parser.add_argument("--ours", default=OURS,
                        help="the backend program to measure as ours (e.g. an older build)")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as disk:
        disk.write(os.urandom(1 << 20) * (DISK_BYTES >> 20))
        disk.flush()
        print(f"{args.rounds} interleaved rounds of {args.seconds} s; medians; ours/qsd ratios"
              f"{'; O_DIRECT' if args.direct else ''}; qsd aio={args.qsd_aio}")
        for workload in (w for w in WORKLOADS if args.only in w[0]):
            results = {"ours": [], "qsd": []}
            for _ in range(args.rounds):
                for kind in ("ours", "qsd"):
                    results[kind].append(run(kind, disk.name, workload, args.seconds, args.direct,
                                               args.ours, args.qsd_aio))
            row = {k: {m: statistics.median(r[m] for r in v) for m in v[0]}
                   for k, v in results.items()}
            o, q = row["ours"], row["qsd"]
            print(f"{workload[0]:18} IOPS ours {o['iops']:8.0f} qsd {q['iops']:8.0f} "
                  f"({o['iops'] / q['iops']:.2f}) | p50 us {o['p50']:6.0f} {q['p50']:6.0f} | "
                  f"p99 us {o['p99']:6.0f} {q['p99']:6.0f} | CPU us/IO {o['cpu_us']:5.1f} "
                  f"{q['cpu_us']:5.1f} ({o['cpu_us'] / q['cpu_us']:.2f})")


if __name__ == "__main__":
    main()
