"""The virtio-net backend on a real tap, driven through our vhost-user frontend by a
host-side driver (tests/framework/net_driver.py). The tap lives in a network namespace
the test creates, so every frame stays inside it: the "guest" is 10.77.0.2 behind the
backend, the namespace's kernel is 10.77.0.1 on the tap."""

import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests.framework.confined import spawn_under_launcher
from tests.framework.jail import check_jailed
from tests.framework.net_backend import BASIC, GUEST_IP, GUEST_MAC, HOST_IP
from tests.framework.net_driver import HDR, HDR_LEN, NetDriver, backend_pair
from tests.framework.netns import Netns
from vmm import children
from vmm._virtq import lib
from vmm.devices.virtio.net import device as D
from vmm.devices.virtio.net import main
from vmm.devices.virtio.net import tap as T
from vmm.vhost_user import protocol as P
from vmm.vhost_user.backend import Backend

pytestmark = pytest.mark.needs_root

ALL = BASIC | D.MRG_RXBUF | D.CSUM | D.GUEST_CSUM | D.HOST_TSO4 | D.HOST_TSO6 | \
    D.GUEST_TSO4 | D.GUEST_TSO6 | D.GUEST_UFO | D.HOST_UFO


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, payload: bytes, sport: int = 4000, dport: int = 5000) -> bytes:
    """Ethernet + IPv4 + UDP from the guest to the namespace, checksums complete."""
    src, dst = socket.inet_aton(GUEST_IP), socket.inet_aton(HOST_IP)
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + udp


@pytest.fixture
def net():
    """(driver, device, namespace, tap MAC) with the backend serving in a thread."""
    with Netns() as ns:
        ns.add_tap("vt0", f"{HOST_IP}/24")
        ns.run("ip", "neigh", "add", GUEST_IP, "lladdr", D.format_mac(GUEST_MAC), "dev", "vt0",
               "nud", "permanent")
        fd = ns.call(T.open_tap, "vt0")
        device = D.NetDevice(fd, GUEST_MAC, ns.call(T.mtu, "vt0"))
        connection, theirs = backend_pair()
        backend = Backend(device, P.Connection(theirs))
        thread = threading.Thread(target=backend.serve, daemon=True)
        thread.start()
        driver = NetDriver(connection)
        try:
            yield driver, device, ns, ns.mac("vt0")
        finally:
            connection.close()
            thread.join(10)
            driver.close()
            os.close(fd)


def listener(ns: Netns, port: int = 5000) -> socket.socket:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST_IP, port))
    sock.settimeout(10)
    return sock


def sender(ns: Netns) -> socket.socket:
    return ns.socket(socket.AF_INET, socket.SOCK_DGRAM)


def test_features_and_config(net):
    driver, device, ns, _ = net
    offered = P.U64.unpack(driver.frontend._request(P.GET_FEATURES, expect_reply=True))[0]
    for feature in (D.VIRTIO_F_VERSION_1, D.MAC, D.STATUS, D.MTU, D.MRG_RXBUF, D.CSUM,
                    D.HOST_TSO4, D.HOST_TSO6, D.GUEST_CSUM, D.GUEST_TSO4, D.GUEST_TSO6):
        assert offered & feature, hex(feature)
    driver.start(BASIC)
    mac, status, pairs, mtu = D.CONFIG.unpack(driver.frontend.get_config(D.CONFIG_SIZE))
    assert (mac, status, pairs, mtu) == (GUEST_MAC, 1, 1, 1500)
    assert struct.unpack("i", fcntl.ioctl(device.tap, lib.TUNGETVNETHDRSZ, bytes(4)))[0] == 12


def test_generated_mac_is_stable_and_locally_administered():
    first = D.generated_mac("vm1", "net0")
    assert first == D.generated_mac("vm1", "net0") != D.generated_mac("vm1", "net1")
    assert first[0] & 0x02 and not first[0] & 0x01


def test_transmit_reaches_the_namespace(net):
    driver, _, ns, tap_mac = net
    driver.start(BASIC)
    sock = listener(ns)
    for i in range(20):
        payload = f"frame {i} ".encode() * (i + 1)
        head = driver.send(udp_frame(tap_mac, payload))
        assert driver.tx.completion() == (head, 0)
        assert sock.recvfrom(65536) == (payload, (GUEST_IP, 4000))


def test_transmit_split_across_buffers(net):
    driver, _, ns, tap_mac = net
    driver.start(BASIC)
    sock = listener(ns)
    data = bytes(HDR_LEN) + udp_frame(tap_mac, b"x" * 1000)
    address = driver.allocate(len(data))
    driver.memory.write(address, data)
    cuts = [0, 5, HDR_LEN, 40, 600, len(data)]       # the header itself split in two
    head = driver.tx.submit([(address + a, b - a, False) for a, b in zip(cuts, cuts[1:])])
    assert driver.tx.completion() == (head, 0)
    assert sock.recvfrom(65536)[0] == b"x" * 1000


def test_receive_from_the_namespace(net):
    driver, _, ns, tap_mac = net
    driver.start(BASIC)
    driver.post_rx(16, 2048)
    out = sender(ns)
    for i in range(8):
        out.sendto(f"hello {i}".encode(), (GUEST_IP, 6000))
        header, frame, buffers = driver.receive()
        assert buffers == 1 and header[6] == 1
        assert frame[:6] == GUEST_MAC and frame[6:12] == tap_mac
        assert frame.endswith(f"hello {i}".encode())


def test_mergeable_buffers_hold_a_frame_in_several_chains(net):
    driver, _, ns, _ = net
    assert driver.start(BASIC | D.MRG_RXBUF) & D.MRG_RXBUF
    driver.post_rx(64, 256)
    payload = os.urandom(1400)
    sender(ns).sendto(payload, (GUEST_IP, 6000))
    header, frame, buffers = driver.receive()
    assert buffers == header[6] == (HDR_LEN + 14 + 20 + 8 + 1400 + 255) // 256
    assert frame.endswith(payload)


def test_no_buffers_then_a_kick_delivers_what_waited(net):
    driver, device, ns, _ = net
    driver.start(BASIC | D.MRG_RXBUF)
    out = sender(ns)
    for i in range(5):
        out.sendto(f"waiting {i}".encode(), (GUEST_IP, 6000))
    # Nothing to put them in: the backend keeps one and stops watching the tap.
    deadline = 100
    while not device.rx.starved and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert device.rx.starved
    driver.post_rx(8, 2048)
    got = [driver.receive()[1] for _ in range(5)]
    assert [g.endswith(f"waiting {i}".encode()) for i, g in enumerate(got)] == [True] * 5


def test_a_frame_too_large_for_a_buffer_is_dropped_without_mergeable(net):
    driver, device, ns, _ = net
    driver.start(BASIC)
    driver.post_rx(1, 100)              # too small for what follows
    driver.post_rx(1, 2048)
    out = sender(ns)
    out.sendto(b"y" * 500, (GUEST_IP, 6000))
    out.sendto(b"small", (GUEST_IP, 6000))
    # The big frame was dropped; the small buffer took the small frame, whose turn it was.
    header, frame, _ = driver.receive()
    assert frame.endswith(b"small")
    assert device.rx.counters["dropped"] >= 1


def test_offloads_follow_the_driver(net):
    """With GUEST_CSUM the namespace's UDP leaves its checksum to the "NIC": the frame
    arrives NEEDS_CSUM; without it, flags are 0 and the checksum is complete."""
    driver, _, ns, _ = net
    negotiated = driver.start(ALL)
    assert negotiated & D.GUEST_CSUM and negotiated & D.GUEST_TSO4
    driver.post_rx(4, 4096)
    sender(ns).sendto(b"z" * 100, (GUEST_IP, 6000))
    header, frame, _ = driver.receive()
    assert header[0] & 1            # VIRTIO_NET_HDR_F_NEEDS_CSUM


def test_no_offloads_means_complete_checksums(net):
    driver, _, ns, _ = net
    driver.start(BASIC)
    driver.post_rx(4, 4096)
    sender(ns).sendto(b"z" * 100, (GUEST_IP, 6000))
    header, frame, _ = driver.receive()
    assert header[0] == 0 and header[1] == 0
    ip = frame[14:34]
    assert checksum(ip) == 0


def test_partial_checksum_from_the_guest(net):
    """CSUM: the guest sends a UDP frame with the checksum left to the device."""
    driver, _, ns, tap_mac = net
    driver.start(BASIC | D.CSUM)
    sock = listener(ns)
    frame = bytearray(udp_frame(tap_mac, b"partial"))
    src, dst = socket.inet_aton(GUEST_IP), socket.inet_aton(HOST_IP)
    udp_len = 8 + len(b"partial")
    # The pseudo-header sum in the checksum field, as Linux leaves it for the NIC.
    pseudo = ~checksum(src + dst + struct.pack("!BBH", 0, 17, udp_len)) & 0xFFFF
    struct.pack_into("!H", frame, 14 + 20 + 6, pseudo)
    header = HDR.pack(1, 0, 0, 0, 14 + 20, 6, 0)      # NEEDS_CSUM at the UDP header
    head = driver.send(bytes(frame), header)
    assert driver.tx.completion() == (head, 0)
    assert sock.recvfrom(100)[0] == b"partial"


def test_malformed_transmit_chains_are_dropped_and_the_next_frame_goes(net):
    driver, device, ns, tap_mac = net
    driver.start(BASIC)
    sock = listener(ns)
    address = driver.allocate(4096)
    driver.memory.write(address, bytes(HDR_LEN) + udp_frame(tap_mac, b"bad"))
    bad = [
        [(address, 8, False)],                                  # shorter than a header
        [(address, 100, False), (address + 100, 64, True)],     # a writable buffer
        [(address, 64, True)],                                  # only writable
    ]
    for chain in bad:
        head = driver.tx.submit(chain)
        assert driver.tx.completion() == (head, 0)
    # A header the tap refuses: a GSO type that does not exist.
    head = driver.send(udp_frame(tap_mac, b"bad"), HDR.pack(0, 0x7F, 0, 1, 0, 0, 0))
    assert driver.tx.completion() == (head, 0)
    assert device.tx.counters["bad_chains"] == 3 and device.tx.counters["dropped"] == 1
    head = driver.send(udp_frame(tap_mac, b"good"))
    assert driver.tx.completion() == (head, 0)
    assert sock.recvfrom(100)[0] == b"good"


def test_malformed_receive_chain_is_returned_empty(net):
    driver, device, ns, _ = net
    driver.start(BASIC | D.MRG_RXBUF)
    address = driver.allocate(2048)
    bad_head = driver.rx.submit([(address, 2048, False)])     # readable: not for rx
    driver.post_rx(4, 2048)
    out = sender(ns)
    out.sendto(b"first", (GUEST_IP, 6000))
    assert driver.rx.completion() == (bad_head, 0)
    out.sendto(b"second", (GUEST_IP, 6000))
    assert driver.receive()[1].endswith(b"second")
    assert device.rx.counters["bad_chains"] == 1


def test_a_broken_ring_stops_that_ring_only(net):
    driver, _, ns, tap_mac = net
    driver.start(BASIC)
    # A transmit head past the end of the ring: the ring protocol is broken.
    driver.tx.publish(driver.tx.num + 5)
    threading.Event().wait(0.2)
    driver.post_rx(2, 2048)
    sender(ns).sendto(b"still", (GUEST_IP, 6000))
    assert driver.receive()[1].endswith(b"still")
    # And the backend still answers the frontend.
    assert len(driver.frontend.get_config(D.CONFIG_SIZE)) == D.CONFIG_SIZE


def test_open_tap_refuses_what_it_cannot_use():
    with Netns() as ns:
        with pytest.raises(T.TapError, match="no such interface"):
            ns.call(T.open_tap, "absent0")
        assert "absent0" not in ns.run("ip", "link").stdout
        ns.run("ip", "tuntap", "add", "dev", "tun0", "mode", "tun")
        with pytest.raises(T.TapError, match="not a tap"):
            ns.call(T.open_tap, "tun0")
        with pytest.raises(T.TapError, match="not a tap"):
            ns.call(T.open_tap, "lo")
        with pytest.raises(T.TapError, match="valid interface name"):
            T.open_tap("x" * 20)


@pytest.mark.parametrize("under_launcher", [False, True], ids=["cold", "under-launcher"])
def test_a_confined_backend_process_moves_frames_both_ways(under_launcher):
    """The launcher's way: a forked process (vmm-net-*) holding the tap and its socket,
    in its empty root, under the virtio-net seccomp profile, with the data path and
    SET_FEATURES's tap ioctls running under the filter; forked as cold-plugged NICs are,
    or from under the launcher's filter, as hot-plugged and restarted ones are."""
    with Netns() as ns:
        ns.add_tap("vt1", f"{HOST_IP}/24")
        ns.run("ip", "neigh", "add", GUEST_IP, "lladdr", D.format_mac(GUEST_MAC), "dev", "vt1",
               "nud", "permanent")
        fd = ns.call(T.open_tap, "vt1")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fork = spawn_under_launcher if under_launcher else children.spawn
        child = fork("vmm-net-test", "net-test", [fd, theirs.fileno()],
                     lambda: main.serve_nic(fd, theirs, GUEST_MAC, 1500, True))
        os.close(fd)
        theirs.close()
        driver = NetDriver(P.Connection(ours))
        try:
            assert driver.start(ALL) & D.GUEST_TSO4
            sock = listener(ns)
            head = driver.send(udp_frame(ns.mac("vt1"), b"out"))
            assert driver.tx.completion() == (head, 0)
            assert sock.recvfrom(100)[0] == b"out"
            driver.post_rx(8, 4096)
            sender(ns).sendto(b"in", (GUEST_IP, 6000))
            assert driver.receive()[1].endswith(b"in")
            assert child.reap() is False                # still alive
            status = open(f"/proc/{child.pid}/status").read()
            assert "\nSeccomp:\t2\n" in status and "\nCapEff:\t0000000000000000\n" in status
            check_jailed(child.pid, os.getpid(), filters=2 if under_launcher else 1)
        finally:
            ours.close()
            driver.close()
            deadline = 50
            while not child.reap() and deadline:
                threading.Event().wait(0.1)
                deadline -= 1
            child.kill()
        assert os.WIFEXITED(child.status) and os.WEXITSTATUS(child.status) == 0, child.status


def test_a_deleted_tap_stops_receive_without_spinning(net):
    driver, device, ns, tap_mac = net
    driver.start(BASIC)
    driver.post_rx(4, 2048)
    ns.run("ip", "link", "del", "vt0")
    deadline = 100
    while not device.rx.counters["errno"] and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert device.rx.counters["errno"] == 77                # EBADFD: the tap is gone
    start = os.times()
    threading.Event().wait(1.0)
    spent = os.times()
    assert (spent.user + spent.system) - (start.user + start.system) < 0.3
    # Transmit fails the same way, frame by frame; the backend still answers.
    head = driver.send(udp_frame(tap_mac, b"nowhere"))
    assert driver.tx.completion() == (head, 0)
    assert device.tx.counters["dropped"] == 1
    assert len(driver.frontend.get_config(D.CONFIG_SIZE)) == D.CONFIG_SIZE


def test_the_program_with_an_inherited_tap_and_socket():
    """stratovirt-vhost-user-net --tap-fd --fd: a supervisor's way (no names, no paths);
    without --mac the MAC is derived from the tap's name."""
    program = os.path.join(os.path.dirname(sys.executable), "stratovirt-vhost-user-net")
    with Netns() as ns:
        ns.add_tap("vt2")
        fd = ns.call(T.open_tap, "vt2")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = subprocess.Popen([program, "--tap-fd", str(fd), "--fd", str(theirs.fileno())],
                                   pass_fds=(fd, theirs.fileno()), stderr=subprocess.PIPE)
        os.close(fd)
        theirs.close()
        driver = NetDriver(P.Connection(ours))
        try:
            driver.start(BASIC)
            mac = D.CONFIG.unpack(driver.frontend.get_config(D.CONFIG_SIZE))[0]
            assert mac == D.generated_mac("vt2")
        finally:
            ours.close()
            driver.close()
            assert backend.wait(10) == 0, backend.stderr.read()


def test_a_legacy_driver_gets_the_10_byte_header(net):
    """Neither VERSION_1 nor MRG_RXBUF: virtio_net_hdr without num_buffers, both ways."""
    driver, device, ns, tap_mac = net
    assert not driver.start(D.MAC | D.STATUS) & (D.VIRTIO_F_VERSION_1 | D.MRG_RXBUF)
    assert struct.unpack("i", fcntl.ioctl(device.tap, lib.TUNGETVNETHDRSZ, bytes(4)))[0] == 10
    sock = listener(ns)
    head = driver.send(udp_frame(tap_mac, b"legacy"), header=bytes(10))
    assert driver.tx.completion() == (head, 0)
    assert sock.recvfrom(100)[0] == b"legacy"
    driver.post_rx(2, 2048)
    sender(ns).sendto(b"back", (GUEST_IP, 6000))
    head, written = driver.rx.completion()
    address, _ = driver.rx_buffers[head]
    data = driver.memory.read(address, written)
    assert data[10:16] == GUEST_MAC and data.endswith(b"back")


def used_flags(driver: NetDriver, ring) -> int:
    return struct.unpack("<H", driver.memory.read(ring.used, 2))[0]


def wait_for(condition, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        threading.Event().wait(0.02)
    return condition()


def test_kicks_are_asked_for_only_when_needed(net):
    """VRING_USED_F_NO_NOTIFY: the receive ring wants kicks only while a frame waits for
    buffers; the transmit ring wants them whenever it is idle."""
    driver, device, ns, tap_mac = net
    driver.start(BASIC | D.MRG_RXBUF)
    driver.post_rx(2, 2048)
    out = sender(ns)
    out.sendto(b"one", (GUEST_IP, 6000))
    assert driver.receive()[1].endswith(b"one")
    assert wait_for(lambda: used_flags(driver, driver.rx) == 1)       # buffers: no kicks
    for i in range(3):                                               # one buffer left
        out.sendto(b"more", (GUEST_IP, 6000))
    assert wait_for(lambda: device.rx.starved)
    assert used_flags(driver, driver.rx) == 0                        # kicks wanted again
    driver.post_rx(4, 2048)                                          # ... and heeded
    assert [driver.receive()[1].endswith(b"more") for _ in range(3)] == [True] * 3
    head = driver.send(udp_frame(tap_mac, b"tx"))
    assert driver.tx.completion() == (head, 0)
    assert wait_for(lambda: used_flags(driver, driver.tx) == 0)
