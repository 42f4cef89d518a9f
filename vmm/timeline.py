"""The start-up timeline: what each process of a VM did when, at debug level in the log.

    STRATOVIRT_LOG_LEVEL=debug stratovirt ... -D vm.log
    grep timeline: vm.log

Each step is one line, `timeline: +12.3 ms <step> (monotonic 8812.345678)`: the time
since this VM's launcher began running our code, and CLOCK_MONOTONIC in seconds, which
every process on the host shares, so a program that started the VMM can place the
steps against its own clock (bench/boot.py --timeline does). The launcher's first line
also gives the CPU time its interpreter had used by then (its start-up and imports).

Marks made before the log exists (process start, config parsed) wait in a list and are
written when log.setup() finds the level at debug; at any other level nothing is kept
and mark() costs one comparison. Forked processes inherit the decision and the origin.
Only this module and `time` are imported: it is imported first of all.
"""

import time

_origin = time.monotonic()
_cpu_at_origin = time.process_time()
_pending: list[tuple[float, str]] | None = [(_origin, "process start")]
_log = None                    # the logger, once the level is debug


def mark(step: str) -> None:
    if _log is not None:
        _write(time.monotonic(), step)
    elif _pending is not None:
        _pending.append((time.monotonic(), step))


def _write(when: float, step: str) -> None:
    _log.debug("timeline: +%.1f ms %s (monotonic %.6f)", (when - _origin) * 1000, step, when)


def restart(origin: float) -> None:
    """A launcher forked by the zygote (vmm/zygote/): the VM's start is its caller's."""
    global _origin, _cpu_at_origin, _pending
    _origin, _cpu_at_origin = origin, 0.0
    _pending = [(origin, "process start"), (time.monotonic(), "forked by the zygote")]


def started(debug: bool) -> None:
    """Called by log.setup(): write what waited (debug) or stop keeping anything."""
    global _log, _pending
    if _pending is None:
        return
    pending, _pending = _pending, None
    if not debug:
        return
    import logging
    _log = logging.getLogger(__name__)
    _log.debug("timeline: the interpreter had used %.1f ms of CPU when our code began",
               _cpu_at_origin * 1000)
    for when, step in pending:
        _write(when, step)
