"""Disk rate limits in the virtio-blk data path (native/ratelimit.c, docs/limits.md),
held against the independent host-side driver at depth: the stand-alone backend with
QEMU-named options, and backends forked as the launcher forks them, under their seccomp
filter, reading the limits page the test (as the launcher) writes and changes.

Figures are rates over a window after the first half second (the bucket starts full,
so its first tenth of a second goes at once); tolerances are the issue's, ±10%.
"""

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.framework import disk_backend
from tests.framework.blk_load import READ, ClosedLoop
from tests.framework.virtio_driver import Driver
from vmm.config.model import Bucket, RateLimit
from vmm.config.ratelimit import rate_bucket
from vmm.vhost_user.protocol import Connection
from vmm.virtio.device_page import DevicePage

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / ".venv/bin/stratovirt-vhost-user-blk"
MiB = 1 << 20
DISK = 64 * MiB
FEATURES = (1 << 32) | (1 << 29)          # VERSION_1, EVENT_IDX


def within(value: float, target: float, tolerance: float = 0.10) -> bool:
    return abs(value - target) <= tolerance * target


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


@pytest.fixture
def program(tmp_path, image):
    """The stand-alone backend with options; a started Driver on it."""
    started = []

    def start(*options: str) -> Driver:
        sock = tmp_path / f"blk{len(started)}.sock"
        process = subprocess.Popen([str(PROGRAM), "--socket-path", str(sock), "--blk-file",
                                    str(image), "--direct", *options])
        client = socket.socket(socket.AF_UNIX)
        started.append((process, client))
        deadline = time.monotonic() + 10
        while True:
            try:
                client.connect(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
        driver = Driver(Connection(client), num=256)
        driver.start(FEATURES)
        started[-1] += (driver,)
        return driver

    yield start
    for process, client, *driver in started:
        client.close()
        for d in driver:
            d.close()
        process.terminate()
        process.wait()


@pytest.fixture
def forked(image):
    """A confined backend forked from this process with a limits page it inherits."""
    made = []

    def start(page: DevicePage) -> Driver:
        child, connection = disk_backend.spawn(image, direct=True, limits=page)
        driver = Driver(connection, num=256)
        made.append((child, connection, driver))
        driver.start(FEATURES)
        return driver

    yield start
    for child, connection, driver in made:
        assert child.status is None, f"the backend died: {child.describe_end()}"
        driver.close()
        connection.close()
        child.kill()


def test_iops_total_holds_4k_random_reads_at_qd32(program):
    result = ClosedLoop(program("--iops-total", "4000"), READ, 4096, 32, DISK).run(3.0)
    steady = result.rate(0.5, 3.0)
    assert within(steady, 4000), f"{steady:.0f} IOPS under --iops-total 4000"


def test_bps_total_holds_128k_reads(program):
    size = 128 << 10
    result = ClosedLoop(program("--bps-total", str(50 * MiB)), READ, size, 8, DISK,
                        randomly=False).run(3.0)
    steady = result.rate(0.5, 3.0) * size / MiB
    assert within(steady, 50), f"{steady:.1f} MiB/s under --bps-total 50 MiB/s"


def test_a_request_larger_than_the_bucket_goes_and_blocks_in_proportion(program):
    """100 KiB/s is a bucket of 10 KiB per 100 ms, and 128 KiB reads: each goes when the
    bucket is full and leaves it in debt; full again 1.28 s later."""
    size = 128 << 10
    result = ClosedLoop(program("--bps-total", str(100 << 10)), READ, size, 1, DISK,
                        randomly=False).run(3.0)
    times = [t - result.started for t in result.completions]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] < 0.1 and len(gaps) >= 2, times
    assert all(1.2 <= gap <= 1.4 for gap in gaps), gaps


def test_a_one_time_burst_is_spent_first_and_not_refilled(forked):
    page = DevicePage((RateLimit(ops=Bucket(size=100, refill_time=1000, one_time_burst=2000)),))
    load = ClosedLoop(forked(page), READ, 4096, 32, DISK)
    first = load.run(2.0)
    at_once = first.rate(0, 0.3) * 0.3
    assert 2000 <= at_once <= 2100 + 32, f"{at_once:.0f} requests in the first 0.3 s"
    steady = first.rate(0.8, 2.0)
    assert within(steady, 100, 0.15), f"{steady:.0f} IOPS after the burst at 100/s"
    time.sleep(1.5)                         # the bucket refills; the burst must not
    second = load.run(0.5)
    assert len(second.completions) <= 100 + 50 + 32, len(second.completions)


def test_a_live_change_takes_effect_within_200_ms(forked):
    page = DevicePage((RateLimit(ops=rate_bucket(500, None, None)),))
    load = ClosedLoop(forked(page), READ, 4096, 32, DISK)
    changes = []

    def change(result, now):
        moments = [(1.0, RateLimit(ops=rate_bucket(5000, None, None))),  # up
                   (2.5, RateLimit(ops=rate_bucket(1000, None, None))),  # down
                   (4.0, None)]                                          # off
        for at, limit in moments[len(changes):len(changes) + 1]:
            if now - result.started >= at:
                page.write(0, limit)
                changes.append(now - result.started)

    result = load.run(5.0, between=change)
    assert len(changes) == 3
    up, down, off = changes
    assert within(result.rate(0.5, up), 500)
    # Each new limit holds from 200 ms after the change on.
    assert within(result.rate(up + 0.2, down), 5000), result.rate(up + 0.2, down)
    assert within(result.rate(down + 0.2, off), 1000), result.rate(down + 0.2, off)
    assert result.rate(off + 0.2, 5.0) > 10_000
    # And it is taken at once: the buckets refill to full on a change, so the first
    # 200 ms after raising the limit already run well above the old rate.
    assert result.rate(up, up + 0.2) > 2500


def test_without_limits_the_data_path_is_not_throttled(forked):
    page = DevicePage()
    result = ClosedLoop(forked(page), READ, 4096, 32, DISK).run(1.0)
    assert result.iops > 10_000


@pytest.mark.parametrize("options,message", [
    (["--iops-total", "0"], "--iops-total: 0 is out of range; allowed 1..9223372036854775807"),
    (["--iops-total", "-5"], '--iops-total: "-5" is not a whole number'),
    (["--bps-total", "fast"], '--bps-total: "fast" is not a whole number'),
    (["--bps-total", str(1 << 63)], f"--bps-total: {1 << 63} is out of range"),
    (["--iops-total-max", "100"], "--iops-total-max: without --iops-total"),
    (["--iops-total", "100", "--iops-total-max", "50"],
     "--iops-total-max: 50 is below the average rate 100"),
])
def test_the_program_refuses_bad_limits_in_one_line(tmp_path, image, options, message):
    sock = tmp_path / "refused.sock"
    run = subprocess.run([str(PROGRAM), "--socket-path", str(sock), "--blk-file", str(image),
                          *options], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"Error: {message}"), run.stderr
    assert "Traceback" not in run.stderr
    assert not sock.exists()
