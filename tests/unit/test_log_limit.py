"""The limiter of guest-triggered log lines (vmm/log_limit.py): the first lines of each
device and kind as they are, then counted, then summed up in one line; keys apart; exact
under threads. Lines go through a real logger to a handler that keeps them."""

import logging
import threading

from vmm.log_limit import Limiter


class Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def logger(name: str) -> tuple[logging.Logger, Kept]:
    kept = Kept()
    log = logging.getLogger(f"test_log_limit.{name}")
    log.handlers[:] = [kept]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, kept


def test_the_first_lines_then_one_summary_of_the_rest():
    log, kept = logger("first")
    limiter = Limiter(first=3, interval=3600)
    for i in range(1000):
        limiter.error(log, "disk slot 1", "broken ring", "ring %d broken", i)
    assert kept.lines == [(logging.ERROR, f"ring {i} broken") for i in range(3)]
    assert limiter.counts() == {("disk slot 1", "broken ring"): 1000}
    limiter.flush()
    assert kept.lines[3:] == [(logging.ERROR, "997 more broken ring from disk slot 1 suppressed")]
    limiter.flush()                                 # nothing more to say
    assert len(kept.lines) == 4
    limiter.error(log, "disk slot 1", "broken ring", "ring %d broken", 1000)
    limiter.flush()
    assert kept.lines[4:] == [(logging.ERROR, "1 more broken ring from disk slot 1 suppressed")]


def test_a_summary_comes_with_the_next_line_once_the_interval_has_passed():
    log, kept = logger("interval")
    limiter = Limiter(first=2, interval=0)
    for _ in range(5):
        limiter.warning(log, "", "refused features", "features refused")
    # Past the first two, each occurrence finds the (empty) interval over: a summary of
    # itself, never the line.
    assert kept.lines == [(logging.WARNING, "features refused")] * 2 + \
        [(logging.WARNING, "1 more refused features suppressed")] * 3
    limiter.flush()
    assert len(kept.lines) == 5


def test_keys_are_apart_and_a_first_line_is_never_hidden():
    log, kept = logger("keys")
    limiter = Limiter(first=1, interval=3600)
    for _ in range(50):
        limiter.error(log, "disk slot 0", "misprogrammed queue", "slot 0 queue")
    limiter.error(log, "disk slot 0", "broken ring", "slot 0 ring")
    limiter.error(log, "NIC slot 0", "misprogrammed queue", "NIC queue")
    limiter.info(log, "", "misprogrammed queue", "backend queue")
    assert [text for _, text in kept.lines] == ["slot 0 queue", "slot 0 ring", "NIC queue",
                                                "backend queue"]
    assert kept.lines[-1][0] == logging.INFO
    assert limiter.counts() == {("disk slot 0", "misprogrammed queue"): 50,
                                ("disk slot 0", "broken ring"): 1,
                                ("NIC slot 0", "misprogrammed queue"): 1,
                                ("", "misprogrammed queue"): 1}
    limiter.flush()
    assert kept.lines[4:] == [(logging.ERROR,
                               "49 more misprogrammed queue from disk slot 0 suppressed")]


def test_threads_lose_no_count():
    log, kept = logger("threads")
    limiter = Limiter(first=5, interval=3600)
    barrier = threading.Barrier(8)

    def hammer():
        barrier.wait()
        for _ in range(5000):
            limiter.error(log, "slot 8", "broken ring", "broken")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limiter.counts() == {("slot 8", "broken ring"): 40000}
    limiter.flush()
    assert [text for _, text in kept.lines] == ["broken"] * 5 + \
        ["39995 more broken ring from slot 8 suppressed"]
