"""The framing between `stratovirt` and its zygote (vmm/zygote/wire.py) on a real
SOCK_SEQPACKET pair: values and fds arrive as sent; anything else is an error with the
fds that came along closed, never a value."""

import marshal
import os

import pytest

from vmm.zygote import wire


@pytest.fixture
def pair():
    import _socket
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_a_request_and_its_fds_arrive_as_sent(pair, tmp_path):
    a, b = pair
    (tmp_path / "f").write_text("x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    request = {"argv": ["stratovirt", "-m", "1G"], "env": {b"K": b"\xff"}, "fds": [0, 9],
               "name": "stratovirt", "started": 1.5}
    wire.send(a, request, [fd, fd])
    message, fds = wire.receive(b)
    assert message == request and len(fds) == 2
    assert os.path.samestat(os.fstat(fds[0]), os.fstat(fd))
    for received in (*fds, fd):
        os.close(received)


def test_the_status_is_a_bare_marshal_int_the_stand_in_can_read(pair):
    a, b = pair
    wire.send(a, -9)
    data = b.recv(64)
    assert len(data) == 5 and data[0] & 0x7f == ord("i")          # native/standin.c's check
    assert int.from_bytes(data[1:], "little", signed=True) == -9


def test_the_peers_end_is_none(pair):
    a, b = pair
    a.close()
    assert wire.receive(b) is None


@pytest.mark.parametrize("payload", [b"\x00garbage", marshal.dumps([1, 2]), marshal.dumps("s")])
def test_not_a_message_is_an_error_and_its_fds_are_closed(pair, payload):
    import _socket
    import array
    a, b = pair
    r, w = os.pipe()
    a.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [r]))])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(wire.WireError):
        wire.receive(b)
    assert set(os.listdir("/proc/self/fd")) <= before      # the received copy was closed
    os.close(r)
    os.close(w)


def test_too_many_fds_or_bytes_are_refused_before_sending(pair):
    a, _ = pair
    with pytest.raises(wire.WireError):
        wire.send(a, {"x": b"y" * wire.MAX_BYTES})
    with pytest.raises(wire.WireError):
        wire.send(a, {}, [0] * (wire.MAX_FDS + 1))
