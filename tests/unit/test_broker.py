"""The broker's policy, asked directly as a compromised vm process could ask it (any
message, any types): what it agrees to open and fork, and what it refuses
(vmm/broker.py, docs/hotplug.md "The broker"). Through QMP the same refusals are
tests/vm/test_hotplug.py's."""

import os
import socket
import stat

import pytest

from vmm import config
from vmm.broker import Broker
from vmm.devices.virtio.block import attach as block_attach
from vmm.machine.memory import GuestMemory, create_memfd

MiB = 1 << 20


@pytest.fixture
def broker(files):
    """A broker whose VM has one cold-plugged disk (its backend forked as the launcher
    forks it)."""
    invocation = config.parse([*files.base(), "-drive",
                               f"file={files.disks[0]},id=cold,direct=false"])
    memory = GuestMemory(create_memfd(8 * MiB), 8 * MiB)
    cold = block_attach.attach(invocation.config.drives[0], 0, memory, seccomp=True)
    broker = Broker(invocation.config, memory, [cold], inherited={os.dup(0)})
    yield broker
    cold.connection.close()
    for backend in broker.processes():
        backend.kill()
    broker.close()


def ask(broker, **message):
    reply, fds = broker.handle({"seq": 1, **message}, [])
    for fd in fds:
        os.close(fd)
    return reply


def refused(broker, **message) -> str:
    reply = ask(broker, **message)
    assert "error" in reply and "ok" not in reply, reply
    return reply["error"]


def test_images_it_opens_and_the_ones_it_does_not(broker, files, tmp_path):
    image = str(files.disks[1])
    assert ask(broker, op="open-disk", node="a", path=image, driver="file",
               read_only=False, direct=False)["ok"] == {"size": 1 << 16}
    link = tmp_path / "link.img"
    link.symlink_to(files.disks[2])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    for path, words in ((image, "is in use by blockdev 'a' (read-write)"),
                        ("disk.img", "is not an absolute path"),
                        (str(tmp_path / "none"), "No such file or directory"),
                        (str(tmp_path), "is a directory"),
                        ("/dev/null", "is a character device"),
                        (str(fifo), "is a FIFO"),
                        (str(tmp_path / "sock"), "is a socket"),
                        (str(link), "is a symbolic link")):
        assert words in refused(broker, op="open-disk", node="b", path=path, driver="file",
                                read_only=True, direct=False), path
    sock.close()
    assert "is a regular file, not a block device" in refused(
        broker, op="open-disk", node="b", path=str(files.disks[2]), driver="host_device",
        read_only=True, direct=False)
    # The cold-plugged disk's image is in use: read-only beside a read-write user is not.
    cold = str(files.disks[0])
    assert "in use by disk 'cold'" in refused(broker, op="open-disk", node="c", path=cold,
                                              driver="file", read_only=True, direct=False)
    # Two read-only users of one image are fine, whatever path names it.
    for node in ("r1", "r2"):
        assert "ok" in ask(broker, op="open-disk", node=node, path=str(files.disks[3]),
                           driver="file", read_only=True, direct=False)
    assert "node-name 'r1' is in use" in refused(broker, op="open-disk", node="r1",
                                                 path=str(files.disks[4]), driver="file",
                                                 read_only=True, direct=False)


def test_garbage_of_any_type_is_refused_and_the_broker_goes_on(broker, files):
    for message in ({"op": "open-disk", "node": ["x"], "path": "/x"},
                    {"op": "open-disk", "node": "x", "path": str(files.disks[5]),
                     "driver": [1], "read_only": True},
                    {"op": "plug", "slot": "1", "device": "d", "config": "c"},
                    {"op": "plug", "slot": 8, "device": "d", "config": "c"},
                    {"op": "plug", "slot": 1, "device": "d" * 300, "config": "c"},
                    {"op": "plug", "slot": 1, "device": "d", "config": "nothing"},
                    {"op": "unplug", "slot": [1]},
                    {"op": "plugged", "slot": 5},
                    {"op": "adopt-tap", "netdev": "n", "number": 1},
                    {"op": "close-disk", "node": "nothing"},
                    {"op": "exec", "argv": ["/bin/sh"]},
                    {"no-op": 1}):
        assert "error" in ask(broker, **message), message
    assert "ok" in ask(broker, op="open-disk", node="x", path=str(files.disks[5]),
                       driver="file", read_only=True, direct=False)


def test_only_fds_it_was_started_with_can_be_named(broker):
    [inherited] = broker.inherited
    # It is stdin's copy, not a tap: refused, and left open (not the broker's to close).
    assert "not a tap" in refused(broker, op="adopt-tap", netdev="n", number=inherited)
    os.fstat(inherited)
    assert "not a file descriptor this VMM was started with" in refused(
        broker, op="adopt-tap", netdev="n", number=0)
    os.close(inherited)


def test_records_are_bounded(broker, tmp_path):
    from vmm.broker import MAX_RECORDS
    for index in range(MAX_RECORDS):
        path = tmp_path / f"{index}.img"
        path.write_bytes(bytes(512))
        assert "ok" in ask(broker, op="open-disk", node=f"n{index}", path=str(path),
                           driver="file", read_only=True, direct=False)
    path = tmp_path / "one-more.img"
    path.write_bytes(bytes(512))
    assert f"{MAX_RECORDS} images and taps are open already" in refused(
        broker, op="open-disk", node="more", path=str(path), driver="file",
        read_only=True, direct=False)


def test_a_plugged_disk_is_forked_with_its_image(broker, files):
    assert "ok" in ask(broker, op="open-disk", node="p", path=str(files.disks[6]),
                       driver="file", read_only=False, direct=False)
    reply, fds = broker.handle({"seq": 2, "op": "plug", "slot": 3, "device": "p",
                                "config": "p", "serial": "sn-1"}, [])
    assert reply["ok"]["index"] == 3 and reply["ok"]["id"] == "p" and len(fds) == 1
    assert stat.S_ISSOCK(os.fstat(fds[0]).st_mode)
    assert "slot 3 has a backend already" in refused(broker, op="plug", slot=3, device="q",
                                                     config="p")
    assert "serial" in refused(broker, op="plug", slot=4, device="q", config="p",
                               serial="\u00e9t\u00e9")
    # Until the vm process says it set the device up, a death is a failed plug, not
    # one to restart (vmm/restart.py).
    child = broker.processes()[-1]
    assert not broker.slot_of(child).up
    assert ask(broker, op="plugged", slot=3) == {"seq": 1, "ok": {}}
    assert broker.slot_of(child).up
    assert ask(broker, op="unplug", slot=3) == {"seq": 1, "ok": {}}
    os.close(fds[0])                    # the backend ends with its connection
    [backend] = broker.released()
    backend.reap(block=True)
    assert broker.ended(backend) and broker.released() == []
