"""NIC rate limits (docs/limits.md): a confined virtio-net backend, forked as the launcher
forks it, on a real tap in a network namespace the test creates, driven by the
host-side driver (tests/framework/net_driver.py). Transmit holds its limit whatever the
driver offers; receive holds its limit while the namespace sends faster (the rest
waits in the tap's queue, and what overflows it is dropped, as on a slow link); a
change written to the limits page (as the launcher writes it) takes effect at once.

Rates are taken after the first half second (the buckets start full); ±10%, the
issue's tolerance."""

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.framework.net_backend import transmit
from tests.unit.test_vhost_user_net import GUEST_IP, udp_frame
from vmm.config.model import RateLimit
from vmm.config.ratelimit import rate_bucket
from vmm.virtio.device_page import DevicePage

pytestmark = pytest.mark.needs_root
ROOT = Path(__file__).resolve().parents[2]


def within(value: float, target: float, tolerance: float = 0.10) -> bool:
    return abs(value - target) <= tolerance * target


def rate(times: list[float], start: float, begin: float, end: float) -> float:
    return sum(1 for t in times if begin <= t - start < end) / (end - begin)


def test_tx_pps_holds(nic):
    page = DevicePage((None, RateLimit(ops=rate_bucket(1000, None, None))))
    driver, _, tap_mac = nic(page)
    start, times = transmit(driver, udp_frame(tap_mac, bytes(100)), 2.5)
    assert within(rate(times, start, 0.5, 2.5), 1000), rate(times, start, 0.5, 2.5)


def test_tx_bps_holds_and_changes_at_once(nic):
    """1 MB/s of 1000-byte frames (the bytes after the driver's header are counted),
    then 4 MB/s from 2 s on."""
    page = DevicePage((None, RateLimit(bandwidth=rate_bucket(1_000_000, None, None))))
    driver, _, tap_mac = nic(page)
    frame = udp_frame(tap_mac, bytes(1000 - 42))
    assert len(frame) == 1000
    changed = []

    def change(elapsed):
        if elapsed >= 2.0 and not changed:
            page.write(1, RateLimit(bandwidth=rate_bucket(4_000_000, None, None)))
            changed.append(elapsed)
    start, times = transmit(driver, frame, 4.0, change)
    before = rate(times, start, 0.5, changed[0]) * 1000
    after = rate(times, start, changed[0] + 0.2, 4.0) * 1000
    assert within(before, 1_000_000), before
    assert within(after, 4_000_000), after


def test_rx_pps_holds_while_the_namespace_sends_faster(nic):
    page = DevicePage((RateLimit(ops=rate_bucket(500, None, None)), None))
    driver, ns, _ = nic(page)
    driver.post_rx(200, 2048)
    sender = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()

    def flood():                     # about 5000 frames a second, 10x the limit
        while not stop.is_set():
            for _ in range(50):
                sender.sendto(b"x" * 100, (GUEST_IP, 6000))
            time.sleep(0.01)
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    times = []
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < 3.0:
            driver.receive()
            times.append(time.perf_counter())
            driver.post_rx(1, 2048)
    finally:
        stop.set()
        thread.join(5)
    assert within(rate(times, start, 0.5, 3.0), 500), rate(times, start, 0.5, 3.0)


def test_no_limits_no_throttling(nic):
    driver, _, tap_mac = nic(DevicePage())
    start, times = transmit(driver, udp_frame(tap_mac, bytes(100)), 1.0)
    assert rate(times, start, 0.2, 1.0) > 5000


@pytest.mark.parametrize("options,message", [
    (["--rx-pps", "0"], "--rx-pps: 0 is out of range; allowed 1..9223372036854775807"),
    (["--tx-bps", "fast"], '--tx-bps: "fast" is not a whole number'),
    (["--tx-bps", str(1 << 63)], f"--tx-bps: {1 << 63} is out of range"),
])
def test_the_program_refuses_bad_limits_in_one_line(tmp_path, options, message):
    """stratovirt-vhost-user-net's --{rx,tx}-{bps,pps}: the rules and messages of
    -netdev's throttling.*, checked before the tap is opened."""
    sock = tmp_path / "refused.sock"
    run = subprocess.run([str(ROOT / ".venv/bin/stratovirt-vhost-user-net"), "--socket-path",
                          str(sock), "--tap", "nosuch0", *options],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"Error: {message}"), run.stderr
    assert "Traceback" not in run.stderr and not sock.exists()
