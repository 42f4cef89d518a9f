"""The control channel's framing (vmm/control.py): messages and fds both ways, and the
ways a peer can go away or misbehave."""

import os
import socket

import msgpack
import pytest

from vmm import control


@pytest.fixture
def pair():
    ours, theirs = control.channel_pair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_message_and_its_fds_arrive_whole(pair):
    ours, theirs = pair
    read_end, write_end = os.pipe()
    control.send(ours, {"op": "plug", "slot": 1}, (write_end,))
    message, fds = control.receive(theirs)
    assert message == {"op": "plug", "slot": 1} and len(fds) == 1
    os.write(fds[0], b"x")
    assert os.read(read_end, 1) == b"x"
    for fd in (read_end, write_end, *fds):
        os.close(fd)


def test_a_closed_peer_is_none(pair):
    ours, theirs = pair
    ours.close()
    assert control.receive(theirs) is None


def test_a_peer_that_died_with_our_messages_unread_is_none_not_an_error(pair):
    """SEQPACKET resets the survivor's next read (ECONNRESET) when the peer closed
    with data still queued for it: the launcher saw this as a traceback."""
    ours, theirs = pair
    control.send(ours, {"event": "never read"})
    theirs.close()
    assert control.receive(ours) is None


def test_garbage_is_a_control_error(pair):
    ours, theirs = pair
    ours.send(b"\xc1")                          # never valid msgpack
    with pytest.raises(control.ControlError):
        control.receive(theirs)
    ours.send(msgpack.packb([1, 2]))
    with pytest.raises(control.ControlError, match="not a map"):
        control.receive(theirs)


def test_nothing_there_with_dontwait_is_blocking_io(pair):
    _, theirs = pair
    with pytest.raises(BlockingIOError):
        control.receive(theirs, socket.MSG_DONTWAIT)
