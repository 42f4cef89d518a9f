"""A confined virtio-net backend on a real tap in a network namespace the test creates,
forked as the launcher forks it, with a device page (limits, counters) the test writes
and reads as the launcher does; and a transmit load from the host-side driver. The
"guest" is 10.77.0.2 behind the backend, the namespace's kernel 10.77.0.1 on the tap."""

import os
import socket
import time
from contextlib import contextmanager

from tests.framework.net_driver import HDR_LEN, NetDriver
from tests.framework.netns import Netns
from vmm import children
from vmm.devices.virtio.net import device as D
from vmm.devices.virtio.net import main
from vmm.devices.virtio.net import tap as T
from vmm.vhost_user import protocol as P

GUEST_MAC = bytes.fromhex("0e0000000002")
GUEST_IP, HOST_IP = "10.77.0.2", "10.77.0.1"
BASIC = D.VIRTIO_F_VERSION_1 | D.MAC | D.STATUS | D.MTU


@contextmanager
def nic_backends():
    """start(page) -> (driver, namespace, tap MAC): a confined backend on tap vt0 with
    that DevicePage (vmm/virtio/device_page.py). A backend that died is the caller's to
    notice (its child's status)."""
    made = []
    with Netns() as ns:
        ns.add_tap("vt0", f"{HOST_IP}/24")
        ns.run("ip", "neigh", "add", GUEST_IP, "lladdr", D.format_mac(GUEST_MAC), "dev", "vt0",
               "nud", "permanent")

        def start(page):
            fd = ns.call(T.open_tap, "vt0")
            mtu = ns.call(T.mtu, "vt0")
            ours, theirs = socket.socketpair(socket.AF_UNIX,
                                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            child = children.spawn("vmm-net-test", "virtio-net", [fd, theirs.fileno()],
                                   lambda: main.serve_nic(fd, theirs, GUEST_MAC, mtu, True, page))
            theirs.close()
            os.close(fd)
            driver = NetDriver(P.Connection(ours))
            made.append((child, ours, driver))
            driver.backend = child
            driver.start(BASIC)
            return driver, ns, ns.mac("vt0")

        try:
            yield start
        finally:
            for child, ours, driver in made:
                ours.close()
                driver.close()
                child.kill()


def transmit(driver: NetDriver, frame: bytes, seconds: float, between=None) -> tuple[float, list]:
    """Keeps up to 128 copies of `frame` queued for `seconds`; each completion's time."""
    data = bytes(HDR_LEN) + frame
    address = driver.allocate(len(data))
    driver.memory.write(address, data)
    times, queued = [], 0
    start = time.perf_counter()
    while True:
        while queued < 128:
            driver.tx.submit([(address, len(data), False)])
            queued += 1
        driver.tx.completion()
        queued -= 1
        now = time.perf_counter()
        times.append(now)
        if between:
            between(now - start)
        if now - start >= seconds:
            break
    while queued:                    # these count too, after `seconds`
        driver.tx.completion()
        queued -= 1
        times.append(time.perf_counter())
    return start, times
