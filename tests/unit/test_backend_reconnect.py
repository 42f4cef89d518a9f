"""A disk's backend killed under load and replaced, at the transport: the launcher's recipe
(attach.py's Attached.respawn: the kept image fd, a confined fork) and the vm process's
reconnect (MmioTransport.backend_restarted), with the guest's driver played from here
as in tests/unit/test_slot_swap.py (registers written as a vCPU would, kicks written to
the queue's eventfd as KVM would).

What must hold (docs/restart.md): every request the driver made available completes
exactly once and with success, whatever was in flight when the backend died (the
in-flight region carries it over); every write is on the image; a kill while the ring is
idle loses no later request; the guest's reset drops the region.
"""

import os
import random
import signal
import time

import pytest

from vmm.config.model import Drive
from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.block import attach as block_attach
from vmm.devices.virtio.block.device import CONFIG_SIZE
from vmm.devices.virtio.empty import EmptyDisk
from vmm.devices.virtio.vhost_user_device import VhostUserDevice
from tests.unit.test_slot_swap import NUM, S_OK, T_IN, T_OUT, Ring, kick
from tests.unit.test_virtio_mmio import MiB, driver_init, memory, vm  # noqa: F401

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
REQUESTS = 40                     # of NUM // 3 request slots


@pytest.fixture
def disk(vm, memory, tmp_path):
    """A live disk slot with a confined backend on a 4 MiB image, as the launcher makes
    one; the Attached whose respawn() makes the next backend."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    attached = block_attach.attach(Drive("d0", str(image), False, False, None), 0, memory,
                                   seccomp=True)
    device = VhostUserDevice("disk d0", 2, attached.connection, memory, (256,), CONFIG_SIZE)
    transport = M.MmioTransport("disk slot 0", 0xD000_0000, 5, EmptyDisk(memory), vm, memory)
    ring = Ring(memory)
    assert driver_init(transport, queue=ring.queue) & M.DRIVER_OK
    transport.replace_device(device)
    state = {"attached": attached}
    yield transport, ring, image, state
    state["attached"].backend.kill()
    state["attached"].forget()
    transport.device.close()


def restart(transport, state, count):
    """Kill the current backend; once it is gone, what the launcher and the vm process
    do: a new backend from the recipe, the device reconnected to it."""
    old = state["attached"]
    os.kill(old.backend.pid, signal.SIGKILL)
    old.backend.reap(block=True)
    state["attached"] = old.respawn(count)
    transport.backend_restarted(state["attached"].connection)


def pattern(request: int, round_: int) -> bytes:
    return bytes([(request * 7 + round_) % 251 + 1]) * 4096


def test_requests_in_flight_when_the_backend_dies_complete_once_and_land(disk):
    transport, ring, image, state = disk
    rng = random.Random(11)
    for round_ in range(10):
        for request in range(REQUESTS):
            ring.post(T_OUT, 8 * request, request, pattern(request, round_))
        kick(transport)
        time.sleep(rng.uniform(0, 0.004))          # some done, some taken, some waiting
        restart(transport, state, round_ + 1)
        done = ring.reap(REQUESTS)
        assert done == {request: S_OK for request in range(REQUESTS)}, round_
        written = image.read_bytes()
        for request in range(REQUESTS):
            assert written[8 * request * 512:][:4096] == pattern(request, round_), \
                (round_, request)
    # Reads after all that see the last round.
    for request in range(REQUESTS):
        ring.post(T_IN, 8 * request, request)
    kick(transport)
    assert ring.reap(REQUESTS) == {request: S_OK for request in range(REQUESTS)}
    assert all(ring.data(r) == pattern(r, 9) for r in range(REQUESTS))


def test_a_backend_killed_while_idle_serves_what_comes_after(disk):
    transport, ring, image, state = disk
    restart(transport, state, 1)
    ring.post(T_OUT, 0, 0, pattern(0, 1))
    kick(transport)
    assert ring.reap(1) == {0: S_OK}
    assert image.read_bytes()[:4096] == pattern(0, 1)


def test_a_request_made_while_the_backend_was_dead_is_served_by_the_next(disk):
    transport, ring, image, state = disk
    old = state["attached"]
    os.kill(old.backend.pid, signal.SIGKILL)
    old.backend.reap(block=True)
    ring.post(T_OUT, 0, 0, pattern(0, 2))
    kick(transport)                                # into an eventfd no one reads yet
    state["attached"] = old.respawn(1)
    transport.backend_restarted(state["attached"].connection)
    assert ring.reap(1) == {0: S_OK}
    assert image.read_bytes()[:4096] == pattern(0, 2)


def test_the_guests_reset_drops_the_region(disk):
    transport, ring, _, _ = disk
    assert transport.device.inflight is not None
    transport.write(M.STATUS, 4, 0)
    assert transport.device.inflight is None
    assert NUM // 3 >= REQUESTS


def test_garbage_in_the_ring_breaks_it_and_kills_nothing(disk):
    """A hostile driver's ring makes the backend stop serving it (a broken device), not
    die: there is no death, so nothing for the launcher to restart, and no loop."""
    transport, ring, _, state = disk
    ring.post(T_OUT, 0, 0, pattern(0, 3))
    # Request 0's data descriptor now points far outside guest RAM.
    ring.memory.write(ring.desc + 16 * 1, (1 << 46).to_bytes(8, "little"))
    kick(transport)
    time.sleep(0.3)
    backend = state["attached"].backend
    assert not backend.reap(), backend.describe_end()
    assert ring.used_idx() == ring.used_seen             # nothing completed from it
