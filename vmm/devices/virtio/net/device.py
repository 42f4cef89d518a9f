"""The virtio-net device on a tap: features, configuration space, and its two queues.

Features offered: VERSION_1, INDIRECT_DESC, MAC, MTU (the tap's), STATUS (link up),
MRG_RXBUF, CSUM, HOST_TSO4, HOST_TSO6 (the tap takes partial checksums and
unsegmented frames through its vnet header), and GUEST_CSUM, GUEST_TSO4, GUEST_TSO6,
GUEST_UFO with HOST_UFO as far as the tap's kernel accepts the matching TUNSETOFFLOAD
flags. No control queue, one queue pair: queue 0 receives, queue 1 transmits.

When the driver's features arrive (SET_FEATURES), the tap's vnet header size is set
to the driver's header (12 bytes, virtio_net_hdr_v1, for VERSION_1 or MRG_RXBUF; 10
for a legacy driver without it) and its offloads to what the driver can receive.
"""

import _sha256          # hashlib's would load OpenSSL (~3 ms and 0.5 MiB per VM)
import struct

from .rxtx import HDR_LEN, LEGACY_HDR_LEN, Receive, Transmit
from . import tap as T

CSUM, GUEST_CSUM, MTU, MAC = 1 << 0, 1 << 1, 1 << 3, 1 << 5
GUEST_TSO4, GUEST_TSO6, GUEST_UFO = 1 << 7, 1 << 8, 1 << 10
HOST_TSO4, HOST_TSO6, HOST_UFO = 1 << 11, 1 << 12, 1 << 14
MRG_RXBUF, STATUS = 1 << 15, 1 << 16
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_VERSION_1 = 1 << 32

S_LINK_UP = 1
RX, TX = 0, 1
QUEUE_SIZE = 256                  # QEMU's default for both queues
MAX_QUEUE_SIZE = 1024             # QEMU's largest rx_queue_size / tx_queue_size
CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
CONFIG_SIZE = CONFIG.size


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def generated_mac(*names: str) -> bytes:
    """A stable, locally administered unicast MAC for a NIC without one in the
    configuration: the first six bytes of SHA-256 over the names (the VM's name and
    the NIC's id), with the multicast bit cleared and the locally administered bit set.
    The same VM configuration gets the same MAC on every boot, so the guest's network
    configuration and the host's neighbour tables stay valid."""
    digest = _sha256.sha256("\0".join(names).encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


class NetDevice:
    num_queues = 2
    max_queue_size = MAX_QUEUE_SIZE

    def __init__(self, tap_fd: int, mac: bytes, mtu: int | None = None, page=None):
        """page: the NIC's DevicePage (vmm/virtio/device_page.py): limits and counters,
        receive in slot 0, transmit in slot 1; or None."""
        self.tap = tap_fd
        self.mac = mac
        self.mtu = mtu
        self.offloads = T.supported_offloads(tap_fd)
        features = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | MAC | STATUS
                    | MRG_RXBUF | CSUM | HOST_TSO4 | HOST_TSO6)
        if mtu:
            features |= MTU
        if self.offloads & T.CSUM:
            features |= GUEST_CSUM
            features |= GUEST_TSO4 if self.offloads & T.TSO4 else 0
            features |= GUEST_TSO6 if self.offloads & T.TSO6 else 0
            features |= GUEST_UFO | HOST_UFO if self.offloads & T.UFO else 0
        self.features = features
        self._page = page               # it must outlive the limiters and counters
        if page is not None:
            self.rx = Receive(tap_fd, page.limiter(RX), page.net_stats(RX))
            self.tx = Transmit(tap_fd, page.limiter(TX), page.net_stats(TX))
        else:
            self.rx, self.tx = Receive(tap_fd), Transmit(tap_fd)
        self.driver_features = 0
        self.set_features(VIRTIO_F_VERSION_1)

    def config(self) -> bytes:
        return CONFIG.pack(self.mac, S_LINK_UP, 1, self.mtu or 0)

    def set_features(self, features: int) -> None:
        """The driver's features (vhost-user SET_FEATURES), before its rings start."""
        features &= self.features
        self.driver_features = features
        hdr_len = HDR_LEN if features & (VIRTIO_F_VERSION_1 | MRG_RXBUF) else LEGACY_HDR_LEN
        T.set_header_size(self.tap, hdr_len)
        offloads = 0
        if features & GUEST_CSUM:
            offloads = T.CSUM
            offloads |= T.TSO4 if features & GUEST_TSO4 else 0
            offloads |= T.TSO6 if features & GUEST_TSO6 else 0
            offloads |= T.UFO if features & GUEST_UFO else 0
        T.set_offloads(self.tap, offloads)
        self.rx.configure(hdr_len, bool(features & MRG_RXBUF), bool(features & GUEST_CSUM))
        self.tx.configure(hdr_len)

    def serve(self, queue, kick: int, call: int, stop: int) -> None:
        """Ring queue.index's worker loop, in C (vmm/vhost_user/backend.py calls it)."""
        (self.rx if queue.index == RX else self.tx).serve(queue, kick, call, stop)
