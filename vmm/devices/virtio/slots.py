"""The slot table: which device is in which virtio-mmio slot, and swapping them.

The machine's slots (layout.py): 0..5 are disk slots and 6..7 NIC slots, StratoVirt's
"replaceable" slots, there from boot whether used or not (an empty one holds the empty
device of its kind, empty.py), filled at boot by -drive and -netdev in order and later
by hot-plug; then one fixed slot each for the console and vsock when configured. QMP
addresses a replaceable slot by its index within its kind (`addr`: disks 0..5, NICs
0..1), as StratoVirt does.

This table only places devices; what a device is made from (a disk image, a tap, its
backend process) is hot-plug's business (vmm/hotplug.py). Callers serialise changes
(the QMP thread makes them all).
"""

from dataclasses import dataclass

from ... import layout
from .empty import EmptyDisk, EmptyNic
from .mmio import MmioTransport

DISK, NIC = "disk", "NIC"
FIRST = {DISK: 0, NIC: layout.BLK_SLOTS}
COUNT = {DISK: layout.BLK_SLOTS, NIC: layout.NET_SLOTS}
EMPTY = {DISK: EmptyDisk, NIC: EmptyNic}


class SlotError(Exception):
    """The request does not fit the slots; the message says why, for the QMP reply."""


@dataclass
class Occupant:
    id: str                   # the device's id (QMP's and the configuration's)
    kind: str
    config: str | None        # the blockdev or netdev it was made from; None: cold-plugged


class SlotTable:
    def __init__(self, transports: list[MmioTransport], memory,
                 occupants: dict[int, Occupant], fixed_ids: dict[str, str]):
        """occupants: the cold-plugged devices by slot; fixed_ids: the ids of devices in
        fixed slots (console, vsock) and what they are, which no device may take."""
        self.transports = transports
        self.memory = memory
        self.occupants = dict(occupants)
        self.fixed_ids = dict(fixed_ids)

    def slot(self, kind: str, addr: int | None) -> int:
        """The slot that `addr` (an index within `kind`) names, or the first empty one."""
        if addr is None:
            for index in range(COUNT[kind]):
                if FIRST[kind] + index not in self.occupants:
                    return FIRST[kind] + index
            raise SlotError(f"every {kind} slot is used ({COUNT[kind]} on this machine)")
        if not 0 <= addr < COUNT[kind]:
            raise SlotError(f"the {kind} slot {addr:#x} does not exist: this machine has "
                            f"{COUNT[kind]} {kind} slots (0x0..{COUNT[kind] - 1:#x})")
        slot = FIRST[kind] + addr
        if slot in self.occupants:
            raise SlotError(f"The slot {addr} is used by device '{self.occupants[slot].id}'")
        return slot

    @staticmethod
    def count(kind: str) -> int:
        return COUNT[kind]

    @staticmethod
    def first(kind: str) -> int:
        return FIRST[kind]

    def index_in_kind(self, slot: int) -> int:
        kind = self.kind_of(slot)
        return slot - FIRST[kind]

    @staticmethod
    def kind_of(slot: int) -> str:
        return DISK if slot < FIRST[NIC] else NIC

    @staticmethod
    def label(slot: int) -> str:
        """How log lines name a slot: "disk slot 1", "NIC slot 0", "slot 8"."""
        if slot >= FIRST[NIC] + COUNT[NIC]:
            return f"slot {slot}"
        kind = SlotTable.kind_of(slot)
        return f"{kind} slot {slot - FIRST[kind]}"

    def find(self, device_id: str) -> int | None:
        for slot, occupant in self.occupants.items():
            if occupant.id == device_id:
                return slot
        return None

    def check_new_id(self, device_id: str) -> None:
        if self.find(device_id) is not None or device_id in self.fixed_ids:
            raise SlotError(f"Duplicate device ID '{device_id}'")

    def using(self, kind: str, config: str) -> Occupant | None:
        """The device made from blockdev or netdev `config`, if one is plugged."""
        for occupant in self.occupants.values():
            if occupant.kind == kind and occupant.config == config:
                return occupant
        return None

    def transport(self, slot: int) -> MmioTransport:
        return self.transports[slot]

    def plug(self, slot: int, device, occupant: Occupant) -> None:
        """Put `device` in the empty slot `slot` (DeviceError: it could not take the
        slot's rings; the slot stays empty)."""
        assert slot not in self.occupants
        self.transports[slot].replace_device(device)
        self.occupants[slot] = occupant

    def unplug(self, slot: int):
        """Empty `slot`: its occupant, and its device for the caller to close (a
        backend process ends when it is)."""
        occupant = self.occupants.pop(slot)
        transport = self.transports[slot]
        empty = EmptyDisk(self.memory, len(transport.device.queue_sizes)) \
            if occupant.kind == DISK else EMPTY[occupant.kind](self.memory)
        old = transport.replace_device(empty)
        return occupant, old
