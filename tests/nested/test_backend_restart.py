"""Backends that come back, seen by Debian's stock kernel as L2 (nested rig): a disk
under continuous checksummed I/O (O_DIRECT and buffered, several requests in flight)
whose backend is SIGKILLed ten times and SIGSYSed four times at random moments (every
other one while the backend is inside a request), a NIC whose backend is killed five
times during a TCP stream each way, a vsock backend killed under an open stream, and a
VM with the default policy whose disk fails at the sixth death. One L1 boot, two L2
boots (tests/nested/l1/restart_checks.py says what each step does); the host side is
tests/vm/test_backend_restart.py.

The stall figures are printed (pytest -s shows them) and kept out of any assertion:
under TCG twice over they are this rig's, not a host's."""

import json

import pytest

from tests.nested.conftest import run_checks

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]

SIGKILL_REASON = "was killed by signal 9 (SIGKILL)"
SIGSYS_REASON = "was killed by a seccomp violation (SIGSYS; the log names the syscall)"


@pytest.fixture(scope="module")
def checks(rig, qmp_wheel, tmp_path_factory):
    found = run_checks(rig, "restart_checks.py", qmp_wheel=qmp_wheel, timeout=1800)
    dump = tmp_path_factory.mktemp("restart") / "checks.json"
    dump.write_text(json.dumps({k: v for k, v in found.items() if k != "console"}, indent=1))
    print("checks in", dump)
    _print_figures(found)
    return found


def _print_figures(found):
    """The figures for the issue's note."""
    for disk in found.get("disk_kills", []):
        stall = disk["stall"]
        print(f"disk: {len(disk['kills'])} kills; guest-visible stall per kill (L2's "
              f"clock): median {stall['median_s']} s, max {stall['max_s']} s, beyond the "
              f"policy's delay median {stall['beyond_delay_median_s']} s; the probe's "
              f"normal gap median {disk['probe_gaps'].get('median_s')} s; kill to "
              f"BACKEND_RESTARTED median {disk['to_event_median_s']} s, kill to the next "
              f"probe write in the image median {disk['to_served_median_s']} s (L1's clock)")
        for kill in disk["kills"]:
            print("  ", {k: kill.get(k) for k in ("signal", "v0", "delay_s", "to_event_s",
                                                   "to_served_s", "stall_s", "in_request",
                                                   "resubmitted")})
        for name, writer in disk["writers"].items():
            print(f"  {name} ({writer['kind']}, {writer['block']} B): {writer['written']} "
                  f"writes completed, {writer['slots']} slots checked in the image")
    for nic in found.get("nic_kills", []):
        print("nic: kill to BACKEND_RESTARTED", [k["to_event_s"] for k in nic["kills"]])
    for vsock in found.get("vsock_kill", []):
        print(f"vsock: kill to BACKEND_RESTARTED {vsock['to_event_s']} s; new stream "
              f"{vsock['new']['seconds']} s")
    for timings in found.get("timings", []):
        print("L1 timings (s):", timings)


def _one(checks, name):
    [found] = checks.get(name, [None])
    assert found, checks["why"]
    return found


def _counted(events, device, reasons):
    """BACKEND_RESTARTED events of `device`, counts 1, 2, ... in order, with `reasons`."""
    assert [e["device"] for e in events] == [device] * len(reasons), events
    assert [e["count"] for e in events] == list(range(1, len(reasons) + 1)), events
    assert [e["reason"] for e in events] == reasons, events


# The disk


def test_every_disk_kill_is_restarted_and_counted(checks):
    disk = _one(checks, "disk_kills")
    kills = disk["kills"]
    assert [k["signal"] for k in kills] == ["SIGKILL"] * 10 + ["SIGSYS"] * 4, kills
    _counted([k["event"] for k in kills], "d0", [SIGKILL_REASON] * 10 + [SIGSYS_REASON] * 4)
    assert len({k["pid"] for k in kills}) == 14          # a new process each time
    # And each time the guest's writes reached the image again.
    assert all(k["to_served_s"] is not None for k in kills), kills
    # The last backend is confined like the first: its filter on the launcher's.
    assert disk["backend"]["Seccomp"] == "2" and disk["backend"]["Seccomp_filters"] == "2"
    assert disk["backend"]["NoNewPrivs"] == "1" and int(disk["backend"]["CapEff"], 16) == 0


def test_the_guest_sees_no_io_error_across_the_kills(checks):
    disk = _one(checks, "disk_kills")
    assert disk["started"] and disk["after_last_kill"], disk
    assert disk["kernel_trouble"] == [], disk["kernel"]
    assert disk["errors"] == []
    for name, writer in disk["writers"].items():
        assert writer["errors"] == 0, (name, writer)       # no failed write
        assert writer["bad"] == 0, (name, writer)          # every read-back matched
        assert writer["written"] == writer["rounds"], (name, writer)
    assert disk["probe_rounds"] > len(disk["kills"])


def test_the_image_holds_every_completed_write(checks):
    """Per slot the last write the guest saw completed, as L1 reads the image; the
    earlier ones were each read back by the guest."""
    disk = _one(checks, "disk_kills")
    for name, writer in disk["writers"].items():
        # Round-robin: every slot of its region once it wrapped, the first ones before.
        assert writer["slots"] == min(writer["written"], writer["region_slots"]), writer
        assert writer["guest"] == writer["host"], (name, writer.get("differ"))
    # Each writer kind wrote through the kills: O_DIRECT at 64 KiB .. 1 MiB, buffered.
    kinds = {(w["kind"], w["block"]) for w in disk["writers"].values()}
    assert kinds == {("direct", 64 << 10), ("direct", 256 << 10), ("direct", 1 << 20),
                     ("buffered", 256 << 10)}
    assert all(w["written"] > 14 for w in disk["writers"].values()), disk["writers"]


def test_requests_in_flight_at_a_kill_are_resubmitted_and_complete(checks):
    """Every other kill waits for the backend to hold a request it took and has not
    completed (d0 is O_DIRECT: an entry queued in its io_uring and not reaped, looked
    at with the backend stopped; the check also knows a buffered disk's
    preadv/pwritev/fdatasync in progress): that
    request never completes in that process, and the next one resubmits it from the
    in-flight region (its log line). A request may still finish between the look and
    the signal (a handled SIGSYS is acted on later than a SIGKILL), so the count is over
    all seven. On 2026-12-07 each of the seven caught ('ring'; five SIGKILLs, two
    SIGSYS) had one request resubmitted and none of the others had. That the resubmitted
    requests completed without an error is the other tests' (no I/O error, every
    read-back and the image match)."""
    disk = _one(checks, "disk_kills")
    caught = [k for k in disk["kills"] if k["in_request"]]
    assert sum(k["resubmitted"] for k in caught) > 0, disk["kills"]


def test_the_stall_per_kill_is_measured(checks):
    """No bound (the figures are printed); each kill's stall was seen by the guest."""
    disk = _one(checks, "disk_kills")
    assert all((k.get("stall_s") or 0) > 0 for k in disk["kills"]), disk["kills"]


# The NIC


def test_a_tcp_stream_each_way_survives_five_nic_kills(checks):
    nic = _one(checks, "nic_kills")
    assert nic["ping"] == 0
    _counted([k["event"] for k in nic["kills"]], "n0", [SIGKILL_REASON] * 5)
    # Every kill came in the middle of both streams.
    for kill in nic["kills"]:
        assert 0 < kill["moved"]["out"] < nic["total"], nic["kills"]
        assert 0 < kill["moved"]["in"] < nic["total"], nic["kills"]
    assert nic["finished"] and nic["nc_status"] == ["0", "0"], nic
    assert nic["out"]["bytes"] == nic["total"] and nic["out"]["guest"] == nic["out"]["host"]
    assert nic["inward"]["bytes"] == nic["total"]
    assert nic["inward"]["guest"] == nic["inward"]["host"]
    assert nic["carrier"] == "1" and nic["ping_after"] == 0


# vsock


def test_a_vsock_stream_open_during_a_kill_is_reset(checks):
    vsock = _one(checks, "vsock_kill")
    assert vsock["greeted"]                                # the stream was up
    _counted([vsock["event"]], "v0", [SIGKILL_REASON])
    old = vsock["old"]
    # The guest's end: the transport reset ended it with an error, no data sent.
    assert old["ended"] and old["status"] not in ("", "0"), old
    assert old["error"].startswith("vsock-io: read stream:"), old
    assert old["host_end"] is not None


def test_new_vsock_streams_work_at_once_after_the_restart(checks):
    vsock = _one(checks, "vsock_kill")
    new = vsock["new"]
    assert new["status"] == 0 and new["reply"] == new["sent"] == new["host"], new
    into = vsock["into"]
    assert into["line"] and into["line"].startswith("OK "), into
    assert into["done"] and into["guest"] == into["host"], into


# The VM's end, and the policy's limit


def test_query_block_counts_and_the_vm_ends_cleanly(checks):
    end = _one(checks, "vm1_end")
    [d0] = [entry for entry in end["query_block"]["return"] if entry["device"] == "d0"]
    assert d0["restarts"] == 14
    restarted = [data for name, data in end["events"] if name == "BACKEND_RESTARTED"]
    assert sorted({e["device"] for e in restarted}) == ["d0", "n0", "v0"]
    assert len(restarted) == 14 + 5 + 1 and len(end["restarting"]) == 20
    assert not [name for name, _ in end["events"] if name == "BACKEND_FAILED"]
    assert end["failed"] == []
    # The launcher took the SIGSYS deaths for seccomp kills (a wait status is all it
    # has); no process hit its filter for real, the restarted backends included (the
    # reporter logs only a trapped syscall, not a SIGSYS sent with kill).
    assert sum("killed by a seccomp violation" in line for line in end["restarting"]) == 4
    assert end["violations"] == []
    assert end["status"] == 0 and end["left"] == ["vm.log"]
    assert end["backends"] == [None, None]


def test_past_the_default_limit_the_device_fails_and_the_vm_goes_on(checks):
    limit = _one(checks, "restart_limit")
    assert limit["size"] == "2048"                         # the 1 MiB disk was there
    _counted(limit["restarted"], "d1", [SIGKILL_REASON] * 5)
    assert limit["failed"] == {"device": "d1", "reason": SIGKILL_REASON}
    [line] = limit["failed_lines"]
    assert "disk d1" in line and "after 5 restarts in 60 s" in line, line
    assert len(limit["restarting"]) == 5
    assert limit["backend_left"] is None
    assert limit["query_status"]["return"]["status"] == "running"
    [d1] = [entry for entry in limit["query_block"]["return"] if entry["device"] == "d1"]
    assert d1["restarts"] == 5
    assert limit["guest"] == "alive-42"                    # the guest goes on
    assert limit["status"] == 0
