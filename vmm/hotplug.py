"""Hot-plug in the vm process: the QMP commands' side of disks and NICs.

blockdev-add and netdev_add record a backend configuration under a name; the launcher's
broker (vmm/broker.py) opens the image or tap right then, so a bad path or a missing tap
is refused at once, as QEMU does, and the vm process itself never opens a host file.
device_add fills a replaceable slot (vmm/devices/virtio/slots.py) of its kind with the
configuration named by `drive`/`netdev`, or else by its own `id` (StratoVirt's v0.1
rule, which Kata follows: node-name equals the device id): the broker forks the backend
and hands back its vhost-user connection, the vm process sets the device up and swaps
it into the slot, and the guest is told by a configuration-change interrupt. device_del
swaps the slot's empty device back in (the backend finishes what it took from the
rings first), lets the backend go, and sends DEVICE_DELETED before it returns.
docs/hotplug.md has the whole story, with what a guest sees.

Everything here runs on the QMP thread, one command at a time.
"""

import logging
import os
import re
import socket
from dataclasses import dataclass

from . import layout
from .config import ratelimit
from .config.errors import ConfigError
from .config.model import MachineConfig, RateLimit
from .control import ControlError, Refused, Requester
from .devices.virtio.mmio import DeviceError
from .devices.virtio.net.device import parse_mac
from .devices.virtio.slots import DISK, NIC, Occupant, SlotError, SlotTable
from .devices.virtio.vhost_user_device import VhostUserDevice
from .qmp.errors import QmpError

log = logging.getLogger(__name__)
MAX_FDS = 16
DRIVERS = {"virtio-blk-mmio": DISK, "virtio-net-mmio": NIC}
_ADDR = re.compile(r"(0[xX])?[0-9a-fA-F]{1,4}")


def _error(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


@dataclass(frozen=True)
class Blockdev:
    node: str
    path: str
    read_only: bool
    direct: bool
    size: int


@dataclass(frozen=True)
class Netdev:
    id: str
    tap: str


class Hotplug:
    def __init__(self, config: MachineConfig, slots: SlotTable, memory, emit,
                 broker: Requester):
        """emit(event, data) sends a QMP event."""
        self.slots = slots
        self.memory = memory
        self.emit = emit
        self.broker = broker
        self.blockdevs: dict[str, Blockdev] = {}
        self.netdevs: dict[str, Netdev] = {}
        self.fds: dict[str, int] = {}
        # Cold-plugged disks, as query-block shows them, until they are unplugged.
        self.cold = {drive.id: Blockdev(drive.id, str(drive.path), drive.read_only,
                                        drive.direct, -1) for drive in config.drives}
        self.restarts: dict[str, int] = {}      # device id -> its backend's restarts
        self.seccomp_faults: dict[str, int] = {}    # seccomp role -> processes it ended
        # Disks' rate limits as they are now (query-block shows them), by device id.
        self.limits: dict[str, RateLimit] = {drive.id: drive.rate_limit
                                             for drive in config.drives if drive.rate_limit}

    def occupants(self, kind: str) -> list:
        """(slot, Occupant) of every filled slot of a kind, in slot order."""
        first = self.slots.first(kind)
        return [(slot, self.slots.occupants[slot])
                for slot in range(first, first + self.slots.count(kind))
                if slot in self.slots.occupants]

    def ask_launcher(self, what: str, op: str, fds=(), **fields) -> tuple[dict, list[int]]:
        """A request to the broker; a refusal or silence is the QMP error of `what`."""
        return self._ask(what, op, fds, **fields)

    def _ask(self, what: str, op: str, fds=(), **fields) -> tuple[dict, list[int]]:
        try:
            return self.broker.ask(op, fds, **fields)
        except Refused as error:
            raise _error(f"{what}: {error}") from None
        except (ControlError, OSError) as error:
            raise _error(f"{what}: the launcher did not answer ({error})") from None

    # getfd / closefd

    def getfd(self, name: str, fd: int) -> None:
        if name[0].isdigit():
            os.close(fd)
            raise _error("Parameter 'fdname' may not start with a digit")
        if name not in self.fds and len(self.fds) >= MAX_FDS:
            os.close(fd)
            raise _error(f"getfd: {MAX_FDS} file descriptors are kept already; closefd one")
        old = self.fds.pop(name, None)
        if old is not None:
            os.close(old)
        self.fds[name] = fd

    def closefd(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is None:
            raise _error(f"File descriptor named '{name}' not found")
        os.close(fd)

    # blockdev-add / blockdev-del

    def blockdev_add(self, args: dict) -> None:
        node = args["node-name"]
        if node in self.blockdevs:
            raise _error(f"Duplicate nodes with node-name='{node}'")
        file = args["file"]
        direct = args.get("cache", {}).get("direct", True)     # as -drive's default
        read_only = args["read-only"]
        reply, _ = self._ask("blockdev-add", "open-disk", node=node, path=file["filename"],
                             driver=file["driver"], read_only=read_only, direct=direct)
        self.blockdevs[node] = Blockdev(node, file["filename"], read_only, direct,
                                        reply.get("size", 0))

    def blockdev_del(self, node: str) -> None:
        if node not in self.blockdevs:
            raise _error(f"Failed to find node with node-name='{node}'")
        user = self.slots.using(DISK, node)
        if user:
            raise _error(f"Node '{node}' is busy: device '{user.id}' uses it (device_del first)")
        self._ask("blockdev-del", "close-disk", node=node)
        del self.blockdevs[node]

    # netdev_add / netdev_del

    def netdev_add(self, args: dict) -> None:
        netdev = args["id"]
        if netdev in self.netdevs:
            raise _error(f"Duplicate netdev id '{netdev}'")
        if args.get("vhost"):
            raise _error("netdev_add: vhost: no vhost-net here; every NIC is served by its "
                         "own vhost-user backend process (leave 'vhost' out or off)")
        ifname, fds = args.get("ifname"), args.get("fds")
        if (ifname is None) == (fds is None):
            raise _error("netdev_add: give 'ifname' (an existing tap) or 'fds' (the name "
                         "of a tap fd passed with getfd), one of them")
        if ifname is not None:
            reply, _ = self._ask("netdev_add", "open-tap", netdev=netdev, ifname=ifname)
        elif ":" in fds:
            raise _error("netdev_add: fds: one fd only (a NIC has one queue pair here)")
        elif fds.isdigit():
            # A number names a tap the launcher was started with (Kata passes taps so).
            reply, _ = self._ask("netdev_add", "adopt-tap", netdev=netdev, number=int(fds))
        elif fds in self.fds:
            fd = self.fds[fds]
            reply, _ = self._ask("netdev_add", "adopt-tap", (fd,), netdev=netdev)
            os.close(self.fds.pop(fds))        # the broker has its own copy now
        else:
            raise _error(f"netdev_add: fds: no file descriptor named '{fds}' (pass the tap "
                         "with getfd first)")
        self.netdevs[netdev] = Netdev(netdev, reply.get("tap", "?"))

    def netdev_del(self, netdev: str) -> None:
        if netdev not in self.netdevs:
            raise _error(f"netdev '{netdev}' not found")
        user = self.slots.using(NIC, netdev)
        if user:
            raise _error(f"netdev '{netdev}' is busy: device '{user.id}' uses it "
                         "(device_del first)")
        self._ask("netdev_del", "close-tap", netdev=netdev)
        del self.netdevs[netdev]

    # device_add / device_del

    def device_add(self, args: dict) -> None:
        device_id, kind = args["id"], DRIVERS[args["driver"]]
        foreign = ("netdev", "mac") if kind == DISK else \
            ("drive", "serial", "logical_block_size", "physical_block_size")
        for key in foreign:
            if key in args:
                raise _error(f"Parameter '{key}' is unexpected for {args['driver']}")
        config = args.get("drive" if kind == DISK else "netdev", device_id)
        records = self.blockdevs if kind == DISK else self.netdevs
        if config not in records:
            what = "blockdev with node-name" if kind == DISK else "netdev with id"
            raise _error(f"device_add: no {what} '{config}' ("
                         f"{'blockdev-add' if kind == DISK else 'netdev_add'} it first)")
        try:
            self.slots.check_new_id(device_id)
            user = self.slots.using(kind, config)
            if user:
                raise SlotError(f"'{config}' is in use by device '{user.id}'")
            slot = self.slots.slot(kind, _addr(args.get("addr")))
        except SlotError as error:
            raise _error(f"device_add: {error}") from None
        mac = args.get("mac")
        if mac is not None:
            try:
                parse_mac(mac)
            except ValueError as error:
                raise _error(f"device_add: mac: {error}") from None
            if self.slots.transport(slot).status:
                raise _error(f"device_add: mac: the guest has probed NIC slot "
                             f"{self.slots.index_in_kind(slot)} already and chosen its MAC "
                             "there; 'mac' works only before it does")
        reply, fds = self._ask("device_add", "plug", slot=slot, device=device_id,
                               config=config, serial=args.get("serial"), mac=mac)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fds[0])
        try:
            device = VhostUserDevice(reply["name"], reply["device_id"], sock, self.memory,
                                     tuple(reply["queue_sizes"]), reply["config_size"])
        except DeviceError as error:
            self._release(slot)
            sock.close()
            raise _error(f"device_add: {error} (the backend did not come up; the log "
                         "has its last words); the slot stays empty") from None
        try:
            self.slots.plug(slot, device, Occupant(device_id, kind, config))
        except DeviceError as error:
            self._release(slot)
            device.close()
            raise _error(f"device_add: {error}") from None
        try:
            self.broker.ask("plugged", slot=slot)       # a death is now worth a restart
        except (Refused, ControlError, OSError) as error:
            log.error("slot %d: the launcher did not take the plug: %s", slot, error)
        log.info("hot-plug: %s in %s slot %d (backend %s)", reply["name"], kind,
                 self.slots.index_in_kind(slot), reply.get("pid"))

    def device_del(self, device_id: str) -> None:
        slot = self.slots.find(device_id)
        if slot is None:
            if device_id in self.slots.fixed_ids:
                raise _error(f"Device '{device_id}' ({self.slots.fixed_ids[device_id]}) "
                             "cannot be removed: only disks and NICs can on this machine")
            raise QmpError("DeviceNotFound", f"Device '{device_id}' not found")
        occupant, device = self.slots.unplug(slot)
        self._release(slot)             # first: the broker then expects the backend's end
        device.close()
        self.cold.pop(device_id, None)
        self.limits.pop(device_id, None)
        log.info("hot-plug: %s %s left slot %d", occupant.kind, device_id,
                 self.slots.index_in_kind(slot))
        self.emit("DEVICE_DELETED", {"device": device_id,
                                     "path": f"/machine/peripheral/{device_id}"})

    def _release(self, slot: int) -> None:
        """The backend of `slot` may go (the broker reaps it, and kills it if it stays);
        said before its connection closes, so its end is no news to the launcher."""
        try:
            self.broker.ask("unplug", slot=slot)
        except (Refused, ControlError, OSError) as error:
            log.error("slot %d: the launcher did not take the backend back: %s", slot, error)

    # block_set_io_throttle

    def set_io_throttle(self, args: dict) -> None:
        """QEMU's block_set_io_throttle for the totals and their bursts; the launcher
        writes the disk's limits page (vmm/virtio/device_page.py)."""
        if ("device" in args) == ("id" in args):
            raise _error("Need exactly one of 'device' and 'id'")
        name = args.get("id") or args["device"]
        slot = self._disk_slot(name, by_id="id" in args)
        for key in sorted(args):
            if any(key.startswith(split) for split in ("bps_rd", "bps_wr", "iops_rd", "iops_wr")) \
                    and args[key]:
                raise _error(f"{key}: separate read and write limits are not supported; "
                             "give the totals, bps and iops")
        if args.get("iops_size"):
            raise _error("iops_size: not supported (each request counts as one)")
        if args.get("group"):
            raise _error("group: throttle groups are not supported")
        qmp = {"iops-total": "iops", "bps-total": "bps", "iops-total-max": "iops_max",
               "bps-total-max": "bps_max", "iops-total-max-length": "iops_max_length",
               "bps-total-max-length": "bps_max_length"}
        try:
            limit = ratelimit.from_rates({key: args[q] for key, q in qmp.items() if args.get(q)},
                                         qmp.get)
        except ConfigError as error:
            raise _error(str(error)) from None
        self._ask("block_set_io_throttle", "set-limits", slot=slot,
                  limits=[ratelimit.to_json(limit)])
        device = self.slots.occupants[slot].id
        if limit.ops or limit.bandwidth:
            self.limits[device] = limit
        else:
            self.limits.pop(device, None)
        log.info("limits of disk %s: %s", device, ratelimit.to_json(limit) or "none")

    def set_nic_io_throttle(self, args: dict) -> None:
        """Our own command for a NIC's limits, in block_set_io_throttle's manner: rx_bps,
        rx_pps, tx_bps, tx_pps (0: none) and their *_max, *_max_length bursts."""
        slot = self.slots.find(args["id"])
        if slot is None or self.slots.kind_of(slot) != NIC:
            raise QmpError("DeviceNotFound", f"NIC '{args['id']}' not found")
        limits = []
        for direction in ("rx", "tx"):
            names = {ratelimit.nic_to_drive(f"{direction}-{name}"): f"{direction}_{name}"
                     for name in ("bps", "pps", "bps_max", "pps_max", "bps_max_length",
                                  "pps_max_length")}
            try:
                limit = ratelimit.from_rates({drive: args[qmp] for drive, qmp in names.items()
                                              if args.get(qmp)}, names.get)
            except ConfigError as error:
                raise _error(str(error)) from None
            limits.append(ratelimit.to_json(limit))
        self._ask("set_nic_io_throttle", "set-limits", slot=slot, limits=limits)
        log.info("limits of NIC %s: rx %s, tx %s", args["id"], limits[0] or "none",
                 limits[1] or "none")

    def _disk_slot(self, name: str, by_id: bool) -> int:
        """The disk slot of a device id, or of the drive (node) name it was made from."""
        for index in range(self.slots.count(DISK)):
            slot = self.slots.first(DISK) + index
            occupant = self.slots.occupants.get(slot)
            if occupant and name == (occupant.id if by_id else occupant.config or occupant.id):
                return slot
        raise QmpError("DeviceNotFound", f"Device '{name}' not found")

    # The launcher's news about backends (vmm/restart.py)

    def backend_events(self) -> None:
        """A backend that died was restarted (its socket comes along) or given up on.
        Called on the QMP thread, which also makes every slot change, so the slot the
        news is about cannot change meanwhile."""
        try:
            events = self.broker.events()
        except ControlError as error:
            log.error("launcher: %s; ignored", error)
            return
        for message, fds in events:
            try:
                self._backend_event(message, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def _backend_event(self, message: dict, fds: list[int]) -> None:
        event, slot, device_id = message.get("event"), message.get("slot"), message.get("device")
        if not isinstance(slot, int) or not 0 <= slot < len(self.slots.transports):
            log.error("launcher: event %r about slot %r; ignored", event, slot)
            return
        occupant = self.slots.occupants.get(slot)
        if slot < layout.BLK_SLOTS + layout.NET_SLOTS and \
                (occupant is None or occupant.id != device_id):
            return                # unplugged meanwhile: its backend goes with the fd
        transport = self.slots.transport(slot)
        reason = str(message.get("reason"))
        faults = message.get("seccomp_faults")
        if isinstance(faults, dict):
            self.seccomp_faults = {str(role)[:32]: count for role, count in faults.items()
                                   if isinstance(count, int)}
        if event == "restarted" and len(fds) == 1:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fds.pop())
            try:
                transport.backend_restarted(sock)
            except DeviceError as error:
                log.error("%s: the restarted backend: %s", transport.who, error)
                return
            count = message.get("count")
            self.restarts[device_id] = count
            log.info("%s: reconnected to its restarted backend (restart %s; the last one "
                     "%s)", transport.who, count, reason)
            self.emit("BACKEND_RESTARTED", {"device": device_id, "count": count,
                                            "reason": reason})
        elif event == "backend-failed":
            self.emit("BACKEND_FAILED", {"device": device_id, "reason": reason})
        else:
            log.error("launcher: unknown event %r; ignored", event)

    # query-block

    def query_block(self) -> list[dict]:
        entries = []
        for index in range(self.slots.count(DISK)):
            slot = self.slots.first(DISK) + index
            occupant = self.slots.occupants.get(slot)
            entry = {"device": occupant.id if occupant else "",
                     "qdev": f"/machine/virtio-mmio/disk-slot-{index}",
                     "slot": index, "removable": True, "locked": False, "type": "unknown",
                     "empty": occupant is None}
            if occupant:
                disk = self.cold[occupant.id] if occupant.config is None \
                    else self.blockdevs[occupant.config]
                entry["inserted"] = {
                    "file": disk.path, "node-name": disk.node, "ro": disk.read_only,
                    "drv": "raw", "encrypted": False, "backing_file_depth": 0,
                    "detect_zeroes": "off",
                    "cache": {"direct": disk.direct, "writeback": True, "no-flush": False}}
                entry["inserted"].update(_throttle(self.limits.get(occupant.id)))
                entry["restarts"] = self.restarts.get(occupant.id, 0)
            entries.append(entry)
        return entries


def _throttle(limit: RateLimit | None) -> dict:
    """query-block's limit fields (QEMU's BlockDeviceInfo), per second, 0: none (to the
    nearest: a burst's refill time is rounded up to whole ms)."""
    def rate(bucket):
        return round(bucket.size * 1000 / bucket.refill_time) if bucket else 0
    limit = limit or RateLimit()
    return {"bps": rate(limit.bandwidth), "bps_rd": 0, "bps_wr": 0,
            "iops": rate(limit.ops), "iops_rd": 0, "iops_wr": 0}


def _addr(text: str | None) -> int | None:
    """A slot index within its kind: hex, with or without 0x (Kata sends "1")."""
    if text is None:
        return None
    if not _ADDR.fullmatch(text):
        raise SlotError(f"addr: '{text}' is not a slot number (hex, e.g. 0x1 or 1)")
    return int(text, 16)
