"""The tiny guest's `watch` mode on our VMM: it polls disk slot 1's capacity through an
MMIO read above 1 GiB (mapped by the guest itself) and shows disk hot-plug as `+` and
`-` on its serial output, with `.` ticks proving its vCPU keeps running."""

import pytest

from tests.framework.microvm import Microvm
from tests.framework.qmp import session
from tests.framework.serial_log import SerialLog

pytestmark = pytest.mark.needs_kvm

BANNER = "tiny guest: 64-bit entry, cmdline: watch "


def _spawn(tmp_path, tiny_guest, *extra: str) -> tuple[Microvm, SerialLog]:
    """Started, its QMP up and its banner line printed (which has `.` and `-` of its
    own: marks are looked for only after it). The VM's own directory is tmp_path/vm, so
    its leftovers are checked apart from the disk images the test makes."""
    (tmp_path / "vm").mkdir()
    vm = Microvm(tmp_path / "vm", tiny_guest, *extra, append="watch").spawn()
    serial = SerialLog(vm.process.stdout)
    try:
        vm.wait_for_api()
        serial.wait_for(b"\n", timeout=30)
    except BaseException:
        vm.kill()
        raise
    return vm, serial


def _finish(vm: Microvm, serial: SerialLog) -> str:
    vm.process.wait(60)
    serial.join()
    err = vm.process.stderr.read().decode(errors="replace")
    assert vm.process.returncode == 0, err
    assert vm.leftovers() == [], vm.leftovers()
    return serial.text()


def test_watch_ticks_and_sees_no_disk_in_an_empty_slot(tmp_path, tiny_guest):
    vm, serial = _spawn(tmp_path, tiny_guest)
    try:
        _, start = serial.wait_for(b"\n")
        for _ in range(3):          # the vCPU runs its loop: ticks keep coming
            _, start = serial.wait_for(b".", start)
            start += 1

        async def steps(qmp, events):
            await qmp.execute("quit")
            await events.wait("SHUTDOWN")

        session(vm.api, steps)
        out = _finish(vm, serial)
    finally:
        vm.kill()
    line, ticks = out.split("\n", 1)
    assert line.startswith(BANNER)
    assert set(ticks) <= {"."} and len(ticks) >= 3


def test_watch_shows_a_disk_plugged_and_unplugged(tmp_path, tiny_guest):
    """Slot 1 twice over: each device_add gives one `+`, each device_del one `-`."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)        # 2048 sectors: the capacity's low half is non-zero
    vm, serial = _spawn(tmp_path, tiny_guest)
    try:
        serial.wait_for(b".", serial.wait_for(b"\n")[1])

        async def steps(qmp, events):
            await qmp.execute("blockdev-add", {
                "node-name": "hot", "file": {"driver": "file", "filename": str(image)},
                "cache": {"direct": False}})
            for _ in range(2):
                mark = serial.mark()
                await qmp.execute("device_add", {"id": "hot", "driver": "virtio-blk-mmio",
                                                 "addr": "0x1"})
                serial.wait_for(b"+", mark)
                mark = serial.mark()
                events.seen.clear()
                await qmp.execute("device_del", {"id": "hot"})
                deleted = await events.wait("DEVICE_DELETED")
                assert deleted["data"] == {"device": "hot",
                                           "path": "/machine/peripheral/hot"}
                serial.wait_for(b"-", mark)
            await qmp.execute("blockdev-del", {"node-name": "hot"})
            await qmp.execute("quit")
            await events.wait("SHUTDOWN")

        session(vm.api, steps, timeout=60)
        out = _finish(vm, serial)
    finally:
        vm.kill()
    line, rest = out.split("\n", 1)
    assert line.startswith(BANNER)
    assert rest.replace(".", "") == "+-+-"


def test_watch_on_a_slot_filled_at_boot_starts_with_a_plus(tmp_path, tiny_guest):
    """A -drive fills slot 0 then slot 1 at boot: the guest's first poll sees slot 1's
    disk; unplugging it gives the `-`."""
    images = []
    for name in ("a", "b"):
        images.append(tmp_path / f"{name}.img")
        with open(images[-1], "wb") as f:
            f.truncate(1 << 20)
    drives = [arg for index, image in enumerate(images)
              for arg in ("-drive", f"file={image},id=d{index},direct=off")]
    vm, serial = _spawn(tmp_path, tiny_guest, *drives)
    try:
        serial.wait_for(b"+", serial.wait_for(b"\n")[1])

        async def steps(qmp, events):
            mark = serial.mark()
            await qmp.execute("device_del", {"id": "d1"})
            await events.wait("DEVICE_DELETED")
            serial.wait_for(b"-", mark)
            await qmp.execute("quit")
            await events.wait("SHUTDOWN")

        session(vm.api, steps, timeout=60)
        out = _finish(vm, serial)
    finally:
        vm.kill()
    assert out.split("\n", 1)[1].replace(".", "") == "+-"


def test_watc_is_no_mode(tmp_path, tiny_guest):
    """`watch` is matched on its first five bytes (`wait` and `echo` on four): `watc`
    alone is no mode, so the guest prints its line and ends the VM."""
    code, out, err = Microvm(tmp_path, tiny_guest, append="watc").run()
    assert code == 0, err
    assert out.startswith("tiny guest: 64-bit entry, cmdline: watc ")
    assert out.endswith("\n")
