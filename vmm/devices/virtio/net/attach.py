"""A -netdev (or a hot-plugged NIC) in the launcher: the tap opened here (it must exist:
tap.py says why) or handed over, its device page made (rx and tx limits written), then
its backend process (vmm-net-<id>) forked with the tap, the page and nothing else of the
launcher's. NICs take slots 6 and 7 in -netdev order."""

import os

from ....config.model import Nic
from ....machine.memory import GuestMemory
from ....virtio.device_page import DevicePage
from ..attach import Attached, AttachError, Slot, spawn_backend
from . import device as D
from . import main
from . import tap as T

VIRTIO_ID_NET = 1


def nic_mac(nic: Nic, vm_name: str) -> bytes:
    """The configured MAC, else a stable generated one (device.generated_mac): from the
    VM's name, the NIC's id and its tap's name; the tap's name keeps two VMs that were
    both left with the default name apart on one host."""
    return D.parse_mac(nic.mac) if nic.mac else D.generated_mac(vm_name, nic.id, nic.tap)


def attach(nic: Nic, index: int, vm_name: str, memory: GuestMemory, seccomp: bool,
           tap: int | None = None) -> Attached:
    """`tap`: the tap, already open (the broker's, for a hot-plug; the caller keeps it);
    else `nic.tap` is opened here and closed once the backend has it."""
    own = tap is None
    if own:
        try:
            tap = T.open_tap(nic.tap)
        except T.TapError as error:
            raise AttachError(f"-netdev id={nic.id}: {error}") from None
    try:
        try:
            mtu = T.mtu(nic.tap)
        except OSError:
            mtu = None          # a tap handed over from another network namespace
        mac = nic_mac(nic, vm_name)
        slot = Slot(index, nic.id, f"NIC {nic.id}", VIRTIO_ID_NET, (D.QUEUE_SIZE,) * 2,
                    D.CONFIG_SIZE)
        page = DevicePage((nic.rx_rate_limit, nic.tx_rate_limit))
        return spawn_backend(slot, f"vmm-net-{nic.id}", f"net-{nic.id}", [tap],
                             lambda sock, fds, _: main.serve_nic(fds[0], sock, mac, mtu, seccomp,
                                                                 page),
                             memory, page)
    except OSError as error:
        raise AttachError(f"-netdev id={nic.id}: tap {nic.tap}: {error.strerror}") from None
    finally:
        if own:
            os.close(tap)
