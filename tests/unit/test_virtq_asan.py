"""native/virtq.c, native/blkio.c and native/ratelimit.c under AddressSanitizer and UBSan:
tests/native/virtq_asan.c feeds the walker hostile and random rings in malloc'ed guest
RAM (completions in and out of order, EVENT_IDX on and off), tests/native/blkio_asan.c
feeds the virtio-blk data path well-formed requests (checked against a model of the
disk) and hostile ones, inline and with many in flight on io_uring and Linux AIO,
tests/native/ratelimit_asan.c the rate limiter hostile configurations;
ASan's redzones catch any
access outside RAM that the Python tests' guard pages might not (reads inside the
process's other memory, a stray byte past a region)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-g", "-O1"]
SANITIZER_ERRORS = ("ERROR: AddressSanitizer", "runtime error")


def build(tmp_path_factory, name, *sources, libraries=()):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup.sh installs it)")
    binary = tmp_path_factory.mktemp(name) / name
    result = subprocess.run(
        [gcc, *FLAGS, f"-I{ROOT / 'native'}", *(str(ROOT / s) for s in sources),
         "-o", str(binary), *(f"-l{library}" for library in libraries)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return binary


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build(tmp_path_factory, "virtq_asan", "tests/native/virtq_asan.c", "native/virtq.c")


@pytest.fixture(scope="module")
def blkio_driver(tmp_path_factory):
    # liburing as the cffi module links it (native/virtq_build.py; scripts/setup.sh
    # installs liburing-dev).
    return build(tmp_path_factory, "blkio_asan", "tests/native/blkio_asan.c",
                 "native/blkio.c", "native/virtq.c", "native/ratelimit.c",
                 libraries=["uring"])


@pytest.fixture(scope="module")
def ratelimit_driver(tmp_path_factory):
    return build(tmp_path_factory, "ratelimit_asan", "tests/native/ratelimit_asan.c",
                 "native/ratelimit.c", libraries=["pthread"])


def run(binary, *args):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([str(binary), *args], capture_output=True, text=True,
                            timeout=300, env=env)
    return result.returncode, result.stdout + result.stderr


def test_hostile_and_random_rings_under_asan_and_ubsan(driver):
    status, output = run(driver)
    assert status == 0, output
    assert not any(error in output for error in SANITIZER_ERRORS), output
    # It did exercise all outcomes, not exit early.
    assert "100000 iterations" in output, output
    counts = {name: int(count) for count, name in re.findall(r"(\d+) (\w+)", output)}
    assert all(counts[name] > 1000 for name in ("chains", "broken", "empty")), output
    assert all(counts[name] > 1000
               for name in ("regions_taken", "regions_refused", "resubmitted")), output


def test_this_build_catches_an_overflow(driver):
    # The same build reading one byte past guest RAM on purpose must be stopped, or the
    # test above proves nothing.
    status, output = run(driver, "overflow")
    assert status != 0
    assert any(error in output for error in SANITIZER_ERRORS), output


def test_blk_requests_under_asan_and_ubsan(blkio_driver):
    status, output = run(blkio_driver)
    assert status == 0, output
    assert not any(error in output for error in SANITIZER_ERRORS), output
    assert "50000 iterations" in output, output
    counts = {name: int(count) for count, name in re.findall(r"(\d+) (\w+)", output)}
    assert all(counts[name] > 1000 for name in ("ok", "ioerr", "unsupp", "broken", "bounced")), output
    # The asynchronous engines (io_uring and Linux AIO): many requests in flight, hostile
    # batches, rings broken with requests in flight.
    assert all(counts[name] > 1000 for name in ("async_batches", "async_started",
                                                "async_broken")), output
    assert "requests through the engine" in output and "refused" not in output, output


def test_rate_limiter_under_asan_and_ubsan(ratelimit_driver):
    """Hostile and extreme bucket configurations (sizes past 2^63, refill times from 1 ns
    to past an hour), random and extreme request sizes: no overflow, no budget above its
    size, no throttling by an off limiter."""
    status, output = run(ratelimit_driver)
    assert status == 0, output
    assert not any(error in output for error in SANITIZER_ERRORS), output
    counts = {name: int(count) for count, name in re.findall(r"(\d+) (\w+)", output)}
    assert "200000 iterations" in output and all(
        counts[name] > 1000 for name in ("charged", "waits", "changes")), output
