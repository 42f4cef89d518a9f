"""virtio-console and vsock end to end: Debian's stock kernel as L2 (nested rig) finds
both through ACPI and uses them through the vm process's virtio-mmio transports and our
backend processes (vmm-con-<id>, vmm-vsock-<id>, each under its seccomp profile). One
L1 boot runs every check (tests/nested/l1/console_vsock_checks.py)."""

import json

import pytest

from tests.nested.conftest import run_checks

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]


@pytest.fixture(scope="module")
def checks(rig, tmp_path_factory):
    found = run_checks(rig, "console_vsock_checks.py")
    dump = tmp_path_factory.mktemp("console_vsock") / "checks.json"
    dump.write_text(json.dumps({k: v for k, v in found.items() if k != "console"}, indent=1))
    print("checks in", dump)
    return found


def _one(checks, name):
    [found] = checks.get(name, [None])
    assert found, checks["why"]
    return found


def test_backend_processes_and_private_sockets(checks):
    found = _one(checks, "processes")
    assert found["names"] == ["vmm-con-con0", "vmm-vm", "vmm-vsock-vs0"]
    assert set(found["modes"].values()) == {"0o600"}


def test_guest_output_kept_while_no_client_newest_64k(checks):
    kept = _one(checks, "console_kept")
    assert kept["kept"] == 65536 and kept["extra"] == 0
    assert [kept["md5"]] == kept["guest_tail_md5"]          # the last 64 KiB of /big


def test_hvc0_both_ways(checks):
    both = _one(checks, "console_both_ways")
    assert both["out_len"] == 256 << 10
    assert both["out_guest"] == [both["out_host"]]
    assert both["in_status"] == 0 and both["in_guest"] == [both["in_host"]]


def test_second_client_refused_first_goes_on(checks):
    second = _one(checks, "console_second")
    assert second["refusal"] == ("stratovirt: console con0 already has a client (one at a "
                                 "time); try again when it disconnects\n")
    assert second["closed"] and second["first"] == "still-first\n"


def test_output_written_while_away_reaches_the_next_client(checks):
    assert _one(checks, "console_reconnect")["got"] == "written-while-away\n"


def test_vsock_guest_to_host_several_streams(checks):
    found = _one(checks, "vsock_guest_to_host")
    assert found["status"] == 0
    assert len(found["sent"]) == 3 and found["sent"] == found["host"] == found["replies"]


def test_vsock_host_to_guest_several_streams(checks):
    found = _one(checks, "vsock_host_to_guest")
    assert found["status"] == 0 and found["guest"] == found["host"]
    assert all(line and line.startswith("OK ") for line in found["oks"]), found["oks"]


def test_vsock_refusals(checks):
    found = _one(checks, "vsock_refused")
    assert found["guest_status"] == 1 and "Connection reset by peer" in found["guest_text"]
    assert found["host_line"] == ""                          # closed without OK


def test_vm_ends_and_leaves_nothing_no_violation(checks):
    ended = _one(checks, "ended")
    assert ended["status"] == 0
    assert ended["left"] == [] and ended["violations"] == [], ended


def test_bad_input_is_one_line_and_creates_nothing(checks):
    bad = _one(checks, "bad_input")
    exists = bad["console_exists"]
    assert exists["status"] == 2 and exists["left"] == ["con.sock"]
    assert exists["stderr"] == ('stratovirt: error: -chardev[0].path: console socket '
                                '"/tmp/bad/con.sock" already exists; remove it first (rm -f '
                                '"/tmp/bad/con.sock") or choose another path\n')
    for name in ("cid_2", "cid_0"):
        cid = bad[name]
        assert cid["status"] == 2 and cid["left"] == ["con.sock"]
        assert cid["stderr"].startswith("stratovirt: error: -device[0].guest-cid: ")
        assert cid["stderr"].endswith("as guest CID is out of range; allowed 3..4294967294\n")
        assert cid["stderr"].count("\n") == 1
