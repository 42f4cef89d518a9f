"""Bounded logging of what a guest causes, so a hostile guest cannot fill the host's disk.

A guest can make the VMM log: a misprogrammed transport, a broken ring, features it may
not have, a bad packet. Each such line goes through `guest` (one Limiter per process),
keyed by device and kind: the first FIRST lines of a key are logged as they are, so the
first occurrence of every kind is always there; later ones are only counted, and at most
one summary line per INTERVAL seconds says how many were suppressed ("312 more broken
ring from disk slot 1 suppressed"). A guest that loops over everything it can get wrong
thus writes at most FIRST lines per key, then one line per key per INTERVAL: a bound
that its speed does not move (tests/vm/test_hostile_guest.py measures it: under 2 KB
per thousand rounds).

The summary is written lazily, by the next occurrence once INTERVAL has passed since
the key's last line, and by flush() when a process or a backend's frontend ends: no
timer, no thread, no syscall the confined processes do not make already (logging reads
the clock itself). Not at a device's reset: a hostile guest resets in its loop.

Guest-triggered means caused by what the guest wrote (registers, rings, packets) or
failed to do (answer a connection); a vsock host client's bad CONNECT line comes here
too (that client may be the tenant's). Lines an operator causes (command line, QMP,
hot-plug) or the host causes (a backend that died) are logged as before, and so are
lines that end the VM (a triple fault): they happen once. Accesses to addresses no
device owns stay with vmm/machine/bus.py: DEBUG, once per address, at most 64
addresses, a tighter bound than this one.

A key's device is a slot's name in the vm process; in a backend process, which serves
one device (its role in the log prefix names it), it is "". Kinds are fixed strings
(vsock's refused connections add an errno's name), so the keys are few.

counts() gives every key's occurrences, logged or not: query-stats reports the vm
process's by kind; a backend process also adds each occurrence to its device page
(count_into), which the launcher reads for query-blockstats, query-stats and -metrics
(docs/metrics.md).
"""

import logging
import threading
import time

FIRST = 5               # lines logged as they are, per device and kind
INTERVAL = 10.0         # seconds, at least, between two summaries of one key


class _Key:
    __slots__ = ("count", "suppressed", "last", "logger", "level")

    def __init__(self):
        self.count = 0              # every occurrence
        self.suppressed = 0         # occurrences since the key's last line
        self.last = 0.0             # time.monotonic() of the key's last line
        self.logger: logging.Logger | None = None     # the last suppressed line's, for flush()
        self.level = logging.NOTSET


class Limiter:
    def __init__(self, first: int = FIRST, interval: float = INTERVAL):
        self.first = first
        self.interval = interval
        self._keys: dict[tuple[str, str], _Key] = {}
        self._lock = threading.Lock()       # vCPU and ring threads log at once
        self._sink = None                   # a uint64_t * every occurrence also adds to

    def count_into(self, sink) -> None:
        """Add every occurrence to *sink as well (a cffi uint64_t * in a device page)."""
        self._sink = sink

    def log(self, logger: logging.Logger, level: int, device: str, kind: str,
            message: str, *args) -> None:
        """`logger.log(level, message, *args)`, or its share of a summary."""
        with self._lock:
            key = self._keys.get((device, kind))
            if key is None:
                key = self._keys[device, kind] = _Key()
            key.count += 1
            if self._sink is not None:
                self._sink[0] += 1
            if key.count <= self.first:
                if key.count == self.first:
                    key.last = time.monotonic()
                summary = 0
            else:
                key.suppressed += 1
                key.logger, key.level = logger, level
                now = time.monotonic()
                if now - key.last < self.interval:
                    return
                summary, key.suppressed, key.last = key.suppressed, 0, now
        if summary:
            _summary(logger, level, device, kind, summary)
        else:
            logger.log(level, message, *args)

    def warning(self, logger: logging.Logger, device: str, kind: str, message: str,
                *args) -> None:
        self.log(logger, logging.WARNING, device, kind, message, *args)

    def error(self, logger: logging.Logger, device: str, kind: str, message: str,
              *args) -> None:
        self.log(logger, logging.ERROR, device, kind, message, *args)

    def info(self, logger: logging.Logger, device: str, kind: str, message: str,
             *args) -> None:
        self.log(logger, logging.INFO, device, kind, message, *args)

    def flush(self) -> None:
        """Write the summary of every key that suppressed lines since its last one."""
        with self._lock:
            due = [(device, kind, key.logger, key.level, key.suppressed)
                   for (device, kind), key in self._keys.items() if key.suppressed]
            for key in self._keys.values():
                key.suppressed = 0
        for device, kind, logger, level, suppressed in due:
            _summary(logger, level, device, kind, suppressed)

    def counts(self) -> dict[tuple[str, str], int]:
        """(device, kind) -> occurrences so far, logged or suppressed."""
        with self._lock:
            return {name: key.count for name, key in self._keys.items()}


def _summary(logger: logging.Logger, level: int, device: str, kind: str, count: int) -> None:
    if device:
        logger.log(level, "%d more %s from %s suppressed", count, kind, device)
    else:
        logger.log(level, "%d more %s suppressed", count, kind)


guest = Limiter()
