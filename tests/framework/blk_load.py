"""A closed-loop disk load from the host-side driver (virtio_driver.Driver): `depth`
requests of `size` bytes kept in flight, and every batch that completes resubmitted
at once with one avail-index update and one kick, as a guest's block layer does.
bench/blk.py measures with it; the rate-limit tests hold it against a limit.

Slot i uses descriptors 3i..3i+2 (header, data, status), written once; only the header
changes between requests.
"""

import random
import struct
import time
from dataclasses import dataclass, field

from tests.framework.virtio_driver import DATA_GPA, Driver

HEADER = struct.Struct("<IIQ")
READ, WRITE = 0, 1
SLOT_BYTES = 0x10_0000


@dataclass
class Result:
    started: float                       # perf_counter at the first submission
    elapsed: float
    completions: list[float] = field(default_factory=list)    # perf_counter of each
    latencies: list[float] = field(default_factory=list)      # seconds, in completion order
    drained: int = 0             # completed after the run, uncounted above

    @property
    def done(self) -> int:
        """Every request completed, the drained ones included."""
        return len(self.completions) + self.drained

    @property
    def iops(self) -> float:
        return len(self.completions) / self.elapsed

    def rate(self, start: float, end: float) -> float:
        """Completions per second between `start` and `end` s after the start."""
        count = sum(1 for t in self.completions if start <= t - self.started < end)
        return count / (end - start)


class ClosedLoop:
    def __init__(self, driver: Driver, op: int, size: int, depth: int, disk_bytes: int,
                 randomly: bool = True):
        if size > SLOT_BYTES - 4096:
            raise ValueError(f"requests of at most {SLOT_BYTES - 4096} bytes")
        self.driver, self.op, self.size, self.depth = driver, op, size, depth
        self.randomly = randomly
        self.sectors = disk_bytes // 512 - size // 512
        self.position = 0
        self.headers = []
        for slot in range(depth):
            base = DATA_GPA + slot * SLOT_BYTES
            driver.write_chain(3 * slot, [(base, 16, False), (base + 4096, size, op == READ),
                                          (base + 16, 1, True)])
            self.headers.append(driver.offset(base, 16))
        self.sent = [0.0] * depth

    def _prepare(self, slot: int, now: float) -> int:
        if self.randomly:
            sector = random.randrange(0, self.sectors, 8)
        else:
            sector = self.position
            self.position = (self.position + self.size // 512) % self.sectors
        HEADER.pack_into(self.driver.view, self.headers[slot], self.op, 0, sector)
        self.sent[slot] = now
        return 3 * slot

    def run(self, seconds: float, between=None) -> Result:
        """Runs for `seconds`; between(result, now), if given, is called after each
        batch of completions (e.g. to change a limit at a chosen moment)."""
        driver = self.driver
        started = time.perf_counter()
        result = Result(started, 0.0)
        driver.post([self._prepare(slot, started) for slot in range(self.depth)])
        while True:
            completed = driver.reap()
            now = time.perf_counter()
            for head, _ in completed:
                result.completions.append(now)
                result.latencies.append(now - self.sent[head // 3])
            if between is not None:
                between(result, now)
            if now - started >= seconds:
                break
            driver.post([self._prepare(head // 3, now) for head, _ in completed])
        result.elapsed = now - started
        # Let what is still in flight finish, so the ring is quiet for the next run.
        outstanding = self.depth - len(completed)
        while outstanding > 0:
            reaped = len(driver.reap())
            outstanding -= reaped
            result.drained += reaped
        return result
