"""A hostile guest on this host's /dev/kvm cannot flood the host's log (vmm/log_limit.py).

The tiny guest's `hostile` mode (guest/tiny.S) misprograms every virtio-mmio slot in a
loop, HOSTILE_ROUNDS rounds of one slot each: FEATURES_OK without VERSION_1, a queue of
size 3, a descriptor table outside RAM, a ring whose available entry is no descriptor.
Behind the slots are real backends (a disk, a NIC on a tap, the console, vsock), empty
disk and NIC slots, and one window with nothing. Unbounded, that is a line per round
(about 165 KB per thousand rounds); bounded, the whole log, start-up included, stays
under 2 KB per thousand rounds, and the first line of every kind from every slot is in
it, and the summaries account for every line they replace.
"""

import re
from collections import Counter

import pytest

from tests.framework.microvm import Microvm
from tests.framework.netns import Netns
from vmm.log_limit import FIRST

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]

ROUNDS = 22000                      # guest/tiny.S, HOSTILE_ROUNDS
PER_THING = ROUNDS // 11 // 4       # rounds each slot gets each of the 4 things
BYTES_PER_THOUSAND = 2048

SLOTS = ["disk slot 0 (disk d0)", *(f"disk slot {i}" for i in range(1, 6)),
         "NIC slot 0 (NIC n0)", "NIC slot 1", "slot 8 (console c0)", "slot 9 (vsock v0)"]
EMPTY = {"disk slot 1", "disk slot 2", "disk slot 3", "disk slot 4", "disk slot 5",
         "NIC slot 1"}
LINE = re.compile(r"\S+ (?P<role>[\w-]+)\[\d+\] \S+ :\w+: [\w.]+: (?P<text>.*)")


def first_lines(slot: str) -> list[str]:
    """The first line of each kind the guest causes in `slot`, as the vm process logs it
    (a regular expression each)."""
    queue = r"queue [01]"
    lines = [rf"{re.escape(slot)}: the driver asked for features 0x0 of 0x[0-9a-f]+; "
             r"FEATURES_OK refused",
             rf"{re.escape(slot)}: {queue}: size 3; allowed a power of 2 up to \d+; the "
             r"device needs a reset",
             rf"{re.escape(slot)}: {queue}: descriptor table at 0x10000300000 is outside "
             r"guest RAM; the device needs a reset"]
    if slot in EMPTY:
        lines.append(rf"{re.escape(slot)}: {queue}: malformed virtqueue: the guest broke "
                     r"the ring protocol")
    return lines


# Each backend's own line for the broken ring, and its role in the log.
BACKENDS = {"blk-d0": r"ring 0: the device stops serving it: malformed virtqueue",
            "net-n0": r"ring 1: the device stops serving it: malformed transmit queue",
            "con-c0": r"ring 1 is broken, the device stops serving it: malformed virtqueue",
            "vsock-v0": r"ring 1 is broken, the device stops serving it: malformed virtqueue"}


def test_a_guest_misprogramming_every_slot_gets_a_bounded_log(tmp_path, tiny_guest):
    disk = tmp_path / "d0.img"
    disk.write_bytes(bytes(1 << 20))
    log_file = tmp_path / "vm" / "log"
    (tmp_path / "vm").mkdir()
    with Netns() as ns:
        ns.add_tap("tap0")
        vm = Microvm(tmp_path / "vm", tiny_guest, "-D", str(log_file),
                     "-drive", f"file={disk},id=d0", "-netdev", "id=n0,netdev=tap0",
                     "-chardev", f"id=c0,path={tmp_path / 'con.sock'}",
                     "-device", "vsock,id=v0,guest-cid=3", append="hostile")
        vm.argv = ns.command(*vm.argv)
        code, out, err = vm.run(timeout=300)
    assert code == 0, err
    assert out.endswith("hostile: done\n"), out[-200:]
    log = log_file.read_text()
    assert len(log.encode()) < BYTES_PER_THOUSAND * ROUNDS // 1000, len(log.encode())

    lines = [LINE.fullmatch(line) for line in log.splitlines()]
    assert all(lines), [line for line, m in zip(log.splitlines(), lines) if not m]
    vm_lines = [m["text"] for m in lines if m["role"] == "vm"]
    for slot in SLOTS:
        for pattern in first_lines(slot):
            logged = [text for text in vm_lines if re.fullmatch(pattern, text)]
            assert logged, (slot, pattern)
    for role, pattern in BACKENDS.items():
        assert any(m["role"] == role and re.match(pattern, m["text"]) for m in lines), role

    # Every occurrence is a line or counted in a summary: FIRST lines of each kind, then
    # summaries that add up to the rest (the misprogrammed queue is two things a slot).
    suppressed = Counter()
    for text in vm_lines:
        if summary := re.fullmatch(r"(\d+) more (.+) from (.+) suppressed", text):
            suppressed[summary[2], summary[3]] += int(summary[1])
    for slot in SLOTS:
        name = slot.split(" (")[0]
        expected = {"refused features": PER_THING, "misprogrammed queue": 2 * PER_THING}
        if slot in EMPTY:
            expected["broken ring"] = PER_THING
        for kind, occurrences in expected.items():
            assert suppressed[kind, name] == occurrences - FIRST, (slot, kind)
    for role in BACKENDS:
        assert any(m["role"] == role and re.fullmatch(r"\d+ more broken ring suppressed",
                                                      m["text"]) for m in lines), role
