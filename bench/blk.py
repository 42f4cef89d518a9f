"""vhost-user-blk backends driven from the host (no guest): ours against
qemu-storage-daemon (qsd) on the same file, in one process, interleaved; medians, the
spread over the rounds, and ratios.

    .venv/bin/python bench/blk.py [--seconds S] [--rounds N] [--only NAME]
                                  [--setups LIST] [--ours PROGRAM] [--markdown]

Setups (--setups picks some, comma-separated; default all but the before ones unless
--before is given):
  direct      ours --direct (O_DIRECT; io_uring engine), the baseline for the next two
  qsd-native  qsd cache.direct=on,aio=native (Linux AIO)
  qsd-uring   qsd cache.direct=on,aio=io_uring
  buffered    ours without --direct (page cache, requests inline)
  qsd-buf     qsd cache.direct=off,aio=io_uring (aio=native needs cache.direct=on)
  limited     ours --direct with limits far above any load (--iops-total 10^9,
              --bps-total 10^12): the cost of charging every request to the buckets
  buffered-limited  the same without --direct
  before, buffered-before  direct and buffered on the build given with --before
Ratios: direct/qsd-native, direct/qsd-uring, buffered/qsd-buf, limited/direct and
buffered-limited/buffered (the rate limiter's cost; docs/limits.md), direct/before and
buffered/buffered-before (a change's cost, side by side in one run).

Workloads: 4k random read and write at QD1 and QD32, 128k sequential read at QD8. Each
round runs every workload on every setup, the setups in a new random order each time.

The driver (tests/framework/virtio_driver.py) plays the guest in Python, the way a
guest's block layer does: QD requests in flight, their descriptors written once; when
the call eventfd fires it reaps every completion there is and resubmits that batch with
one avail-index update and one kick; VIRTIO_RING_F_EVENT_IDX is negotiated (Linux does),
so kicks and interrupts follow avail_event and used_event on both backends. Latency runs
from just before a request's header is written to the moment its completion is reaped.
The driver's own cost per request is part of every figure and the same for both
backends; on a small machine it, not the backend, can be the limit, so CPU per I/O (the
backend's utime+stime per completed request, all threads, from /proc: io_uring's and
qsd's worker threads included) is the fairer comparison.

--ours measures another build of our backend instead of this one; --before PROGRAM runs
one beside it in the same rounds (setups before, buffered-before). Take figures that are to
be kept under the machine's benchmark lock:
    flock /tmp/stratovirt-bench.lock .venv/bin/python bench/blk.py --rounds 3
"""

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework.blk_load import ClosedLoop  # noqa: E402
from tests.framework.virtio_driver import Driver  # noqa: E402
from vmm.vhost_user.protocol import Connection  # noqa: E402

DISK_BYTES = 256 << 20
OURS = str(ROOT / ".venv/bin/stratovirt-vhost-user-blk")
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
# name, op (0 read, 1 write), bytes, depth, random
WORKLOADS = [("randread 4k QD1", 0, 4096, 1, True), ("randread 4k QD32", 0, 4096, 32, True),
             ("randwrite 4k QD1", 1, 4096, 1, True), ("randwrite 4k QD32", 1, 4096, 32, True),
             ("read 128k QD8", 0, 128 << 10, 8, False)]
# name: (kind, direct, qsd aio, more options of ours)
HIGH_LIMITS = ("--iops-total", str(10**9), "--bps-total", str(10**12))
SETUPS = {"direct": ("ours", True, None, ()), "qsd-native": ("qsd", True, "native", ()),
          "qsd-uring": ("qsd", True, "io_uring", ()), "buffered": ("ours", False, None, ()),
          "qsd-buf": ("qsd", False, "io_uring", ()),
          "limited": ("ours", True, None, HIGH_LIMITS),
          "buffered-limited": ("ours", False, None, HIGH_LIMITS),
          "before": ("before", True, None, ()), "buffered-before": ("before", False, None, ())}
RATIOS = [("direct", "qsd-native"), ("direct", "qsd-uring"), ("buffered", "qsd-buf"),
          ("limited", "direct"), ("buffered-limited", "buffered"), ("direct", "before"),
          ("buffered", "buffered-before")]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(setup: str, disk: str, sock: str, ours: dict, log) -> subprocess.Popen:
    kind, direct, aio, more = SETUPS[setup]
    if os.path.exists(sock):
        os.unlink(sock)
    if kind in ours:
        argv = [ours[kind], "--socket-path", sock, "--blk-file", disk] + \
            (["--direct"] if direct else []) + list(more)
    else:
        argv = ["qemu-storage-daemon", "--blockdev",
                f"driver=file,node-name=f,filename={disk},cache.direct={'on' if direct else 'off'},"
                f"aio={aio}",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                            f"addr.path={sock},writable=on"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    while not os.path.exists(sock):
        if process.poll() is not None:
            raise SystemExit(f"{setup}: {argv[0]} exited with {process.returncode}")
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


def run(setup: str, disk: str, workload, seconds: float, ours: dict, log) -> dict:
    name, op, size, depth, randomly = workload
    sock = f"{tempfile.gettempdir()}/bench-blk-{os.getpid()}.sock"
    backend = start(setup, disk, sock, ours, log)
    client = socket.socket(socket.AF_UNIX)
    try:
        connect(client, sock)
    except BaseException:
        backend.kill()
        backend.wait()
        raise
    driver = Driver(Connection(client), num=256)
    try:
        driver.start(VERSION_1 | EVENT_IDX)
        load = ClosedLoop(driver, op, size, depth, DISK_BYTES, randomly)
        cpu_before = cpu_seconds(backend.pid)
        result = load.run(seconds)
        cpu = cpu_seconds(backend.pid) - cpu_before
        latencies = sorted(result.latencies)
        return {"iops": result.iops, "p50": latencies[len(latencies) // 2] * 1e6,
                "p99": latencies[int(len(latencies) * 0.99)] * 1e6,
                "cpu_us": cpu / len(latencies) * 1e6}
    finally:
        client.close()
        driver.close()
        backend.terminate()
        backend.wait()


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="run the workloads whose name contains this")
    parser.add_argument("--setups", default="",
                        help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--ours", default=OURS,
                        help="the backend program to measure as ours (e.g. an older build)")
    parser.add_argument("--before", help="a build to run beside ours (setups before, "
                                         "buffered-before)")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args()
    setups = [s for s in args.setups.split(",") if s] if args.setups else \
        [s for s in SETUPS if SETUPS[s][0] != "before" or args.before]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; known: {list(SETUPS)}")
    if any(SETUPS[s][0] == "before" for s in setups) and not args.before:
        parser.error("the before setups need --before PROGRAM")
    programs = {"ours": args.ours, "before": args.before}
    workloads = [w for w in WORKLOADS if args.only in w[0]]
    rng = random.Random(1)
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as disk, \
            tempfile.TemporaryFile(mode="w+") as log:
        disk.write(os.urandom(1 << 20) * (DISK_BYTES >> 20))
        disk.flush()
        os.fsync(disk.fileno())
        print(f"{args.rounds} interleaved rounds of {args.seconds} s per workload and setup; "
              f"medians [spread: min-max over the rounds]; ratios ours/qsd of the medians "
              f"[min-max of each round's ratio]")
        results = {(w[0], s): [] for w in workloads for s in setups}
        for round_ in range(args.rounds):
            for workload in workloads:
                order = list(setups)
                rng.shuffle(order)
                for setup in order:
                    results[workload[0], setup].append(
                        run(setup, disk.name, workload, args.seconds, programs, log))
            print(f"  round {round_ + 1} done", file=sys.stderr)
        log.seek(0)
        engines = sorted({line.split("I/O engine: ", 1)[1].split(",")[0].strip()
                          for line in log if "I/O engine: " in line})
        print(f"our engines: {'; '.join(engines)}")
        rows = []
        for workload in workloads:
            name = workload[0]
            for setup in setups:
                r = results[name, setup]
                med = {m: statistics.median(x[m] for x in r) for m in r[0]}
                print(f"{name:18} {setup:11} IOPS {med['iops']:8.0f} [{spread([x['iops'] for x in r]):>13}] "
                      f"p50 {med['p50']:6.0f} us  p99 {med['p99']:6.0f} us "
                      f"[{spread([x['p99'] for x in r]):>11}]  CPU/IO {med['cpu_us']:5.1f} us")
            for ours, theirs in RATIOS:
                if ours in setups and theirs in setups:
                    a, b = results[name, ours], results[name, theirs]
                    ma = statistics.median(x["iops"] for x in a)
                    mb = statistics.median(x["iops"] for x in b)
                    per_round = [x["iops"] / y["iops"] for x, y in zip(a, b)]
                    ca = statistics.median(x["cpu_us"] for x in a)
                    cb = statistics.median(x["cpu_us"] for x in b)
                    print(f"{'':18} {ours}/{theirs}: IOPS {ma / mb:.2f} "
                          f"[{min(per_round):.2f}-{max(per_round):.2f}], CPU per I/O "
                          f"{ca / cb:.2f}")
                    rows.append((name, ours, theirs, a, b))
        if args.markdown:
            print()
            print("| workload | ours | IOPS ours [spread] | qsd | IOPS qsd [spread] | ratio "
                  "[per round] | p99 µs ours / qsd | CPU µs/IO ours / qsd |")
            print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
            for name, ours, theirs, a, b in rows:
                med = lambda r, m: statistics.median(x[m] for x in r)  # noqa: E731
                per_round = [x["iops"] / y["iops"] for x, y in zip(a, b)]
                print(f"| {name} | {ours} | {med(a, 'iops'):.0f} [{spread([x['iops'] for x in a])}] "
                      f"| {theirs} | {med(b, 'iops'):.0f} [{spread([x['iops'] for x in b])}] "
                      f"| {med(a, 'iops') / med(b, 'iops'):.2f} [{min(per_round):.2f}-"
                      f"{max(per_round):.2f}] | {med(a, 'p99'):.0f} / {med(b, 'p99'):.0f} "
                      f"| {med(a, 'cpu_us'):.1f} / {med(b, 'cpu_us'):.1f} |")


if __name__ == "__main__":
    main()
