"""virtio-net end to end: Debian's stock kernel as L2 (nested rig) with two NICs on taps
that L1 creates, through the vm process's virtio-mmio transports and one vhost-user
backend process per NIC. One L1 boot runs every check (tests/nested/l1/net_checks.py).

L2 gets a read-only disk holding `rawsend` (tests/nested/l1/rawsend.c, built here
statically), which sends malformed frames out of its NICs."""

import subprocess

import pytest

from tests.nested.conftest import L1_DIR, run_checks

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]


@pytest.fixture(scope="module")
def checks(rig, tmp_path_factory):
    tools = tmp_path_factory.mktemp("tools")
    subprocess.run(["gcc", "-static", "-O2", "-o", tools / "rawsend", L1_DIR / "rawsend.c"],
                   check=True)
    image = tmp_path_factory.mktemp("image") / "tools.ext4"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tools, image], check=True)
    return run_checks(rig, "net_checks.py", files={"tools.ext4": image})


def _one(checks, name):
    [found] = checks.get(name, [None])
    assert found, checks["why"]
    return found


def test_two_nics_ping_both_ways(checks):
    nics = _one(checks, "two_nics")
    assert nics["macs"]["eth0"] == "0e:00:00:00:00:02"
    assert nics["macs"]["eth1"] == _one(checks, "generated_mac")["mac"]
    assert nics["ping_out"] == {"eth0": 0, "eth1": 0}
    assert nics["ping_in"] == {"eth0": 0, "eth1": 0}


def test_offloads_negotiated_by_the_stock_driver(checks):
    bits = _one(checks, "two_nics")["features"]
    # CSUM, GUEST_CSUM, MAC, GUEST_TSO4, GUEST_TSO6, HOST_TSO4, HOST_TSO6, MRG_RXBUF,
    # STATUS, VERSION_1
    for bit in (0, 1, 5, 7, 8, 11, 12, 15, 16, 32):
        assert bits[bit] == "1", (bit, bits)


def test_tcp_transfers_both_ways_on_both_nics(checks):
    nics = _one(checks, "two_nics")
    for name in ("transfer0", "transfer1", "after_transfer"):
        for direction in ("out", "in"):
            moved = nics[name][direction]
            assert moved["status"] == 0 and moved["guest"] == moved["host"], (name, direction)


def test_malformed_frames_from_the_guest_break_nothing(checks):
    nics = _one(checks, "two_nics")
    assert all(line.startswith("rawsend: ") for line in nics["rawsend"]), nics["rawsend"]
    assert nics["after_ping"] == [0, 0]
    # The same backend processes before and after: none died and was replaced.
    assert sorted(nics["backends_before"]) == ["vmm-net-net0", "vmm-net-net1"]
    assert nics["backends_after"] == nics["backends_before"]


def test_the_vm_ends_cleanly_and_leaves_nothing(checks):
    nics = _one(checks, "two_nics")
    assert nics["status"] == 0
    assert not nics["api_left"] and nics["backends_left"] == {}


def test_a_tap_that_does_not_exist_is_one_line_and_leaves_nothing(checks):
    missing = _one(checks, "missing_tap")
    assert missing["status"] == 1
    assert missing["stderr"] == ("stratovirt: error: -netdev id=bad: tap nosuch0: no such "
                                 "interface; create it first (ip tuntap add dev nosuch0 "
                                 "mode tap)\n")
    assert not missing["api_left"] and missing["backends_left"] == {}
    assert not missing["created"]


def test_an_empty_nic_slot_is_a_nic_without_carrier(checks):
    empty = _one(checks, "empty_slot")
    assert empty["driver"] == "virtio_net" and empty["carrier"] == "0"
    assert empty["ping_empty"] != 0 and empty["ping0"] == 0
    assert empty["status"] == 0


def test_a_tx_limit_holds_a_tcp_stream(checks):
    """eth1's throttling.tx-bps: L2's TCP stream out of it arrives at the limit (±15%;
    the limit counts Ethernet frames, the stream its payload), eth0's unlimited one in
    the same boot much faster."""
    nics = _one(checks, "two_nics")
    limit = nics["tx_limit"]
    limited, free = nics["transfer1"]["out"]["rate"], nics["transfer0"]["out"]["rate"]
    assert free > 3 * limit, (free, limit)            # else the limit would not bind
    assert abs(limited - limit) <= 0.15 * limit, (limited, limit)
