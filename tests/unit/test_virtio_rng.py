"""The virtio-rng backend driven from the host (tests/framework/virtio_queues.py plays the
guest's driver over vhost-user): the guest gets exactly what the source gives, never an
empty buffer, at most the rate limit, and a throttled request stays in the ring when the
ring stops; hostile chains break nothing."""

import logging
import os
import socket
import threading
import time

import pytest

from tests.framework.virtio_queues import QueueDriver
from vmm.config.model import Bucket, RateLimit
from vmm.devices.virtio.rng.device import CHUNK, RngDevice
from vmm.vhost_user import protocol as P
from vmm.vhost_user.backend import Backend
from vmm.virtio.device_page import DevicePage

VERSION_1 = 1 << 32


class Rng:
    """An rng backend on a thread reading `source`, and its driver."""

    def __init__(self, source: int, limit: RateLimit | None = None):
        self.page = DevicePage((limit,)) if limit else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        device = RngDevice(source, self.page, "rng r0")
        self.thread = threading.Thread(
            target=lambda: Backend(device, P.Connection(theirs)).serve(), daemon=True)
        self.thread.start()
        self.driver = QueueDriver(P.Connection(ours), [256])
        self.driver.start(VERSION_1)
        [self.ring] = self.driver.rings

    def request(self, size: int) -> int:
        return self.ring.add([(size, True)])

    def close(self):
        self.driver.frontend.connection.sock.close()
        self.thread.join(10)
        self.driver.close()
        if self.page:
            self.page.close()


@pytest.fixture
def pipe():
    """A source the test controls: what the guest must get, byte for byte."""
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield read, write
    os.close(read)
    os.close(write)


@pytest.fixture
def urandom():
    fd = os.open("/dev/urandom", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def test_guest_gets_what_the_source_gives(pipe):
    read, write = pipe
    given = os.urandom(50_000)
    os.write(write, given[:30_000])
    rng = Rng(read)
    try:
        got = b""
        sizes = iter([1, 64, 4096, 9000, 65536, 100, 4096] * 10)
        while len(got) < len(given):
            if len(got) == 30_000:
                os.write(write, given[30_000:])
            rng.request(next(sizes))
            for _, written, data in rng.ring.wait_used():
                assert written == len(data) > 0
                got += data
        assert got == given
    finally:
        rng.close()


def test_a_source_with_nothing_now_leaves_the_request_waiting(pipe):
    """Never an empty buffer (virtio 1.2, 5.4.6.1: one or more bytes): the request
    waits until the source has bytes, then gets them."""
    read, write = pipe
    rng = Rng(read)
    try:
        head = rng.request(4096)
        with pytest.raises(TimeoutError):
            rng.ring.wait_used(timeout=0.5)
        os.write(write, b"0123456789")
        assert rng.ring.wait_used() == [(head, 10, b"0123456789")]
    finally:
        rng.close()


def test_a_source_that_ends_is_logged_once_and_the_device_lives(caplog):
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    rng = Rng(null)
    try:
        with caplog.at_level(logging.INFO, "vmm.devices.virtio.rng.device"):
            rng.request(64)
            with pytest.raises(TimeoutError):
                rng.ring.wait_used(timeout=0.5)
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["rng r0: the entropy source gives nothing (end of file); the guest "
                         "waits, it is asked again every 50 ms"]
        assert rng.thread.is_alive()
    finally:
        rng.close()
        os.close(null)


def test_a_request_takes_at_most_a_chunk(urandom):
    rng = Rng(urandom)
    try:
        rng.request(72 << 10)
        [(_, written, data)] = rng.ring.wait_used()
        assert written == CHUNK and len(set(data)) > 200
    finally:
        rng.close()


def test_hostile_chains_get_an_empty_completion_and_the_device_goes_on(urandom):
    rng = Rng(urandom)
    try:
        head = rng.ring.add([b"no writable buffer"])
        assert rng.ring.wait_used() == [(head, 0, b"")]
        head = rng.request(32)
        [(done, written, _)] = rng.ring.wait_used()
        assert (done, written) == (head, 32)
    finally:
        rng.close()


def test_rate_limit_holds(urandom):
    """4096 bytes per 100 ms: after the full bucket, 40960 bytes/s (within 10%) however
    fast the guest asks."""
    rate = 40960
    rng = Rng(urandom, RateLimit(bandwidth=Bucket(4096, 100)))
    try:
        for _ in range(16):
            rng.request(512)
        total, start = 0, time.monotonic()
        while time.monotonic() - start < 2.0:
            for _, written, _ in rng.ring.wait_used():
                total += written
                rng.request(512)
        elapsed = time.monotonic() - start
        measured = (total - 4096) / elapsed
        assert abs(measured - rate) / rate < 0.10, measured
    finally:
        rng.close()


def test_a_throttled_request_stays_in_the_ring_when_it_stops(urandom):
    """The bucket pays for one 1024-byte request a minute: the second waits unpopped, so
    GET_VRING_BASE hands it back with the ring; a ring started again serves it first
    once the limit allows (here: the limit lifted)."""
    rng = Rng(urandom, RateLimit(bandwidth=Bucket(1024, 60_000)))
    try:
        first, second = rng.request(1024), rng.request(1024)
        assert [(h, w) for h, w, _ in rng.ring.wait_used()] == [(first, 1024)]
        with pytest.raises(TimeoutError):
            rng.ring.wait_used(timeout=0.5)
        assert rng.driver.frontend.stop_ring(0) == 1
        rng.page.write(0, None)
        rng.driver.restart_ring(0, 1)
        assert [(h, w) for h, w, _ in rng.ring.wait_used()] == [(second, 1024)]
    finally:
        rng.close()
