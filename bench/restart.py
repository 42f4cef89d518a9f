"""A disk backend killed with a write in flight, until a new one has completed that write:
the host-side driver plays the frontend (tests/framework/virtio_driver.py), the backends
are forked and confined as the launcher does it (vmm.children.spawn + serve_disk, the
virtio-blk filter), and the write comes back from the inflight region. Needs root.

    sudo .venv/bin/python bench/restart.py [--kills N]

Each of N kills (default 50): the image's file system holds writes (FIFREEZE, outside
the timing), one write is made available and the backend takes it (the region says it
is in flight; the backend sits in pwritev), then, timed from just before the SIGKILL:
- dead:      the file system released, the kernel abandons the write, the process dies
             and the pidfd says so;
- forked:    a new backend forked and confining itself (children.spawn returns at once:
             this is the fork, its confinement overlaps the handshake);
- handshake: features, memory table, SET_INFLIGHT_FD, the ring (num, base, addresses,
             kick, call, enable), each request acknowledged (REPLY_ACK);
- served:    the new backend resubmits the write from the region and completes it.
The total is kill -> the first completion of a request that was in flight. Through the
real launcher and vm process, bench/restart_vm.py. QEMU has no figure to compare: it
restarts no vhost-user backend itself.
"""

import argparse
import os
import select
import signal
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework import disk_backend  # noqa: E402
from tests.framework.virtio_driver import DATA_GPA, Driver  # noqa: E402

VERSION_1 = 1 << 32
T_OUT = 1
PHASES = ("dead", "forked", "handshake", "served")


def wait(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)


def kill_and_restart(fs, image: Path, driver: Driver, child, head: int) -> tuple:
    """One kill with the write at `head` in flight; the new child and the phase times."""
    fs.hold()
    driver.post([head])
    wait(lambda: head in driver.in_flight(), "the backend to take the write")
    t0 = time.perf_counter()
    os.kill(child.pid, signal.SIGKILL)
    fs.release()
    select.select([child.pidfd], [], [])
    t_dead = time.perf_counter()
    child.reap(block=True)
    driver.frontend.connection.close()
    child, connection = disk_backend.spawn(image, name="vmm-blk-bench")
    t_forked = time.perf_counter()
    driver.reconnect(connection, VERSION_1)
    t_ready = time.perf_counter()
    done = driver.reap()
    t_done = time.perf_counter()
    assert [h for h, _ in done] == [head], done
    return child, (t_dead - t0, t_forked - t_dead, t_ready - t_forked, t_done - t_ready)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/restart.py: needs root (it mounts a small file system to hold writes)")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as where:
        fs = disk_backend.HoldableFs(Path(where))
        child = driver = None
        try:
            image = fs.root / "disk.img"
            image.write_bytes(bytes(16 << 20))
            child, connection = disk_backend.spawn(image, name="vmm-blk-bench")
            driver = Driver(connection, mem_size=64 << 20, num=256)
            driver.start(VERSION_1, inflight=True)
            base = DATA_GPA
            driver.memory.write(base, struct.pack("<IIQ", T_OUT, 0, 0))
            driver.memory.write(base + 0x1000, os.urandom(4096))
            driver.write_chain(0, [(base, 16, False), (base + 0x1000, 4096, False),
                                   (base + 0x20, 1, True)])
            samples = []
            for _ in range(args.kills):
                child, phases = kill_and_restart(fs, image, driver, child, 0)
                samples.append(phases)
        finally:
            fs.release()
            if child is not None:
                child.kill()
            if driver is not None:
                driver.close()
            fs.close()
    totals = sorted(sum(s) * 1e3 for s in samples)
    p99 = totals[min(len(totals) - 1, int(len(totals) * 0.99))]
    print(f"kill -> a new confined backend completed the write that was in flight, "
          f"{len(totals)} kills (ms): median {statistics.median(totals):.1f}, p99 {p99:.1f}, "
          f"min {totals[0]:.1f}, max {totals[-1]:.1f}")
    print("  medians (ms): " + ", ".join(
        f"{name} {statistics.median(s[i] for s in samples) * 1e3:.2f}"
        for i, name in enumerate(PHASES)))


if __name__ == "__main__":
    main()
