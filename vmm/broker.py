"""The broker: what the launcher, the only privileged process, does for the vm process
once the VM runs, and the policy it holds to (docs/hotplug.md, "The broker").

The vm process runs QMP but never opens a host file or a tap, and cannot fork: for
blockdev-add, netdev_add and device_add it asks here over the control channel, and the
launcher opens the image or tap and forks the device's backend, confined exactly as a
cold-plugged one. A compromised vm process can get no more than a QMP client could ask
for:

- an image: an absolute path whose last component is not a symlink, that is a regular
  file (blockdev-add's file.driver "file") or a block device ("host_device"), never a
  character device, directory, FIFO or socket. The type is read from an O_PATH
  descriptor, which opens nothing, and the real open (O_NOFOLLOW | O_NONBLOCK, so a
  FIFO swapped in meanwhile cannot block us) must reach the same inode. Not an image
  this VM already has open read-write, and not one it has open at all when read-write
  is asked (QEMU's image locking, within one VM).
- a tap: an existing tap opened as cold-plugged ones are (tap.py), or a tap fd the QMP
  client passed with getfd, or one the launcher was started with (netdev_add's `fds`
  as a number, as Kata passes taps), that TUNGETIFF shows is a tap with a vnet header.
  No other fd of the launcher's can be named.
- a backend: one per replaceable slot (disks 0..5, NICs 6..7), made from a disk or tap
  recorded here; its process is forked from the launcher like a cold-plugged one, so
  it holds that image or tap, its vhost-user socket, its limits page and nothing else.
- a disk's or NIC's rate limits: new values, checked as the JSON file's are, written
  into that device's page (vmm/virtio/device_page.py), whose limits only the launcher
  writes; and the counters the backends keep there, read (query-blockstats,
  query-stats).
- a backend again, for a device whose backend died: never on request. The launcher's
  restart policy (vmm/restart.py) decides, and respawn() forks it from the recipe kept
  since the device was plugged (the same image, tap or socket; attach.py).

At most MAX_RECORDS images and taps are kept open at once. Requests and replies are
control.py messages: {"op", "seq", ...} -> {"seq", "ok": {...}} or {"seq", "error"}.
"""

import errno
import logging
import os
import stat
from dataclasses import asdict, dataclass

from . import children, layout
from .config import ratelimit
from .config.errors import ConfigError
from .config.model import Drive, MachineConfig, Nic
from .devices.virtio.attach import Attached, AttachError
from .devices.virtio.block import attach as block_attach
from .devices.virtio.net import attach as net_attach
from .devices.virtio.net import tap as T
from .machine.memory import GuestMemory

log = logging.getLogger(__name__)
MAX_RECORDS = 16
REPLACEABLE = layout.BLK_SLOTS + layout.NET_SLOTS


class Refused(Exception):
    """The request is against the policy or cannot be done; the message is the reply."""


@dataclass
class Image:
    node: str
    path: str
    fd: int
    read_only: bool
    direct: bool
    key: tuple[int, int]          # st_dev, st_ino: the same image under any path


@dataclass
class Tap:
    netdev: str
    name: str
    fd: int


@dataclass
class Backend:
    slot: int
    device: str
    attached: Attached                 # the latest backend, and the recipe for another
    image: tuple[tuple[int, int], bool] | None = None    # key, read_only (cold disks)
    # The vm process has set the device up with it (cold ones: before the VM ran). A
    # hot-plugged backend that dies before is a failed device_add, not one to restart.
    up: bool = True

    @property
    def child(self) -> children.Child:
        return self.attached.backend


class Broker:
    def __init__(self, config: MachineConfig, memory: GuestMemory, cold: list[Attached],
                 inherited: set[int]):
        """inherited: the fds the launcher was started with (beyond stdio)."""
        self.config = config
        self.inherited = set(inherited)
        self.memory = memory
        self.images: dict[str, Image] = {}
        self.taps: dict[str, Tap] = {}
        self.backends: dict[int, Backend] = {}
        self.leaving: list[Backend] = []          # unplugged, not yet reaped
        drives = {drive.id: drive for drive in config.drives}
        for attached in cold:
            slot = attached.slot
            image = None
            if slot.id in drives and slot.index < layout.BLK_SLOTS:
                st = os.stat(drives[slot.id].path)
                image = ((st.st_dev, st.st_ino), drives[slot.id].read_only)
            self.backends[slot.index] = Backend(slot.index, slot.id, attached, image)

    # The control channel's requests.

    def handle(self, message: dict, fds: list[int]) -> tuple[dict, list[int]]:
        """The reply to one request, and the fds that go with it."""
        op = message.get("op")
        handler = {"open-disk": self._open_disk, "close-disk": self._close_disk,
                   "open-tap": self._open_tap, "adopt-tap": self._adopt_tap,
                   "close-tap": self._close_tap, "plug": self._plug,
                   "plugged": self._plugged, "unplug": self._unplug,
                   "set-limits": self._set_limits, "stats": self._stats}.get(op)
        reply_fds: list[int] = []
        try:
            if handler is None:
                raise Refused(f"unknown request {str(op)[:32]!r}")
            result = handler(message, fds, reply_fds)
            reply = {"seq": message.get("seq"), "ok": result}
        except Refused as error:
            reply = {"seq": message.get("seq"), "error": str(error)}
        except (TypeError, ValueError, KeyError) as error:
            # A request no vm process of ours sends: the less trusted side is refused,
            # the launcher goes on.
            log.error("broker: malformed %s request: %s", str(op)[:32], error)
            reply = {"seq": message.get("seq"), "error": "malformed request"}
        finally:
            for fd in fds:             # whatever was passed and not kept
                if fd >= 0:
                    os.close(fd)
        return reply, reply_fds

    def _text(self, message: dict, key: str, limit: int = 4096) -> str:
        value = message.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= limit or "\0" in value:
            raise Refused(f"{key}: a name of 1..{limit} characters is needed")
        return value

    def _room(self) -> None:
        if len(self.images) + len(self.taps) >= MAX_RECORDS:
            raise Refused(f"{MAX_RECORDS} images and taps are open already, the most one VM "
                          "may hold; delete one first")

    def _open_disk(self, message, fds, reply_fds) -> dict:
        node = self._text(message, "node", 128)
        path = self._text(message, "path")
        read_only, direct = bool(message.get("read_only")), bool(message.get("direct"))
        driver = message.get("driver")
        if node in self.images:
            raise Refused(f"node-name '{node}' is in use already")
        self._room()
        if not os.path.isabs(path):
            raise Refused(f"file.filename: '{path}' is not an absolute path")
        fd = _open_image(path, driver, read_only, direct)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        holder = self._holder(key, read_only)
        if holder:
            os.close(fd)
            raise Refused(f"file.filename: {path} is in use by {holder}"
                          + ("" if read_only else "; a read-write image must be the only user"))
        self.images[node] = Image(node, path, fd, read_only, direct, key)
        size = os.lseek(fd, 0, os.SEEK_END)
        log.info("broker: blockdev %s: %s opened (%s%s)", node, path,
                 "read-only" if read_only else "read-write", ", O_DIRECT" if direct else "")
        return {"size": size}

    def _holder(self, key: tuple[int, int], read_only: bool) -> str | None:
        """Who else has this image open in a way that conflicts with `read_only`."""
        for image in self.images.values():
            if image.key == key and not (read_only and image.read_only):
                return f"blockdev '{image.node}'" + ("" if image.read_only else " (read-write)")
        for backend in self.backends.values():
            if backend.image and backend.image[0] == key and not (read_only and backend.image[1]):
                return f"disk '{backend.device}'"
        return None

    def _close_disk(self, message, fds, reply_fds) -> dict:
        image = self.images.pop(self._text(message, "node", 128), None)
        if image is None:
            raise Refused("no such node-name")
        os.close(image.fd)
        log.info("broker: blockdev %s closed", image.node)
        return {}

    def _open_tap(self, message, fds, reply_fds) -> dict:
        netdev = self._text(message, "netdev", 128)
        self._new_netdev(netdev)
        try:
            fd = T.open_tap(self._text(message, "ifname", 15))
        except T.TapError as error:
            raise Refused(f"ifname: {error}") from None
        return self._keep_tap(netdev, fd)

    def _adopt_tap(self, message, fds, reply_fds) -> dict:
        netdev = self._text(message, "netdev", 128)
        number = message.get("number")
        if number is not None:
            if fds or number not in self.inherited:
                raise Refused(f"fds: {number} is not a file descriptor this VMM was started "
                              "with; pass the tap with getfd")
            fds = [number]
        elif len(fds) != 1:
            raise Refused("fds: one tap file descriptor is needed")
        self._new_netdev(netdev)
        try:
            T.check_tap_fd(fds[0])
        except T.TapError as error:
            if number is not None:
                fds.clear()                  # not ours to close
            raise Refused(f"fds: {error}") from None
        fd, fds[0] = fds[0], -1
        self.inherited.discard(fd)
        # The backend reads a tap until EAGAIN: one passed blocking would stall it. (The
        # flag is the open file's, so the client's copy becomes non-blocking too, as
        # with QEMU.)
        os.set_blocking(fd, False)
        return self._keep_tap(netdev, fd)

    def _new_netdev(self, netdev: str) -> None:
        if netdev in self.taps:
            raise Refused(f"netdev id '{netdev}' is in use already")
        self._room()

    def _keep_tap(self, netdev: str, fd: int) -> dict:
        name = T.name_of(fd)
        self.taps[netdev] = Tap(netdev, name, fd)
        log.info("broker: netdev %s: tap %s", netdev, name)
        return {"tap": name}

    def _close_tap(self, message, fds, reply_fds) -> dict:
        tap = self.taps.pop(self._text(message, "netdev", 128), None)
        if tap is None:
            raise Refused("no such netdev")
        os.close(tap.fd)
        log.info("broker: netdev %s closed", tap.netdev)
        return {}

    def _plug(self, message, fds, reply_fds) -> dict:
        slot = message.get("slot")
        if not isinstance(slot, int) or not 0 <= slot < REPLACEABLE:
            raise Refused(f"slot: {slot!r} is not a replaceable slot (0..{REPLACEABLE - 1})")
        if slot in self.backends:
            raise Refused(f"slot {slot} has a backend already")
        device = self._text(message, "device", 128)
        config = self._text(message, "config", 128)
        try:
            if slot < layout.BLK_SLOTS:
                image = self.images.get(config)
                if image is None:
                    raise Refused(f"no blockdev '{config}'")
                drive = Drive(device, image.path, image.read_only, image.direct,
                              _serial(message.get("serial")),
                              layout.disk_queues(self.config.machine.vcpus))
                attached = block_attach.attach(drive, slot, self.memory, self.config.seccomp,
                                               disk=image.fd)
            else:
                tap = self.taps.get(config)
                if tap is None:
                    raise Refused(f"no netdev '{config}'")
                mac = message.get("mac")
                nic = Nic(device, tap.name, mac if isinstance(mac, str) else None)
                attached = net_attach.attach(nic, slot, self.config.machine.name,
                                             self.memory, self.config.seccomp, tap=tap.fd)
        except AttachError as error:
            raise Refused(str(error)) from None
        except (OSError, ValueError) as error:
            raise Refused(f"the backend could not start: {error}") from None
        self.backends[slot] = Backend(slot, device, attached, up=False)
        reply_fds.append(attached.connection.detach())
        log.info("broker: %s: backend %d in slot %d", attached.slot.name,
                 attached.backend.pid, slot)
        return asdict(attached.slot) | {"pid": attached.backend.pid}

    def _plugged(self, message, fds, reply_fds) -> dict:
        """The vm process set up the device of a plug: from now on a death is restarted."""
        slot = message.get("slot")
        backend = self.backends.get(slot) if isinstance(slot, int) else None
        if backend is None:
            raise Refused("no backend in that slot")
        backend.up = True
        return {}

    def _unplug(self, message, fds, reply_fds) -> dict:
        slot = message.get("slot")
        backend = self.backends.get(slot) if isinstance(slot, int) and slot < REPLACEABLE \
            else None
        if backend is None:
            raise Refused("no backend in that slot")
        del self.backends[slot]
        backend.attached.forget()
        if backend.child.status is None:
            self.leaving.append(backend)   # it ends when its socket closes
        return {}

    def _set_limits(self, message, fds, reply_fds) -> dict:
        """New rate limits for a disk or a NIC (block_set_io_throttle,
        set_nic_io_throttle): `limits` is a list, the disk's one or the NIC's rx and
        tx, each checked as the JSON file's rate_limiter is (null: none), all written
        to the device's limits page or none."""
        slot = message.get("slot")
        backend = self.backends.get(slot) if isinstance(slot, int) else None
        if backend is None or backend.attached.page is None:
            raise Refused("no disk or NIC in that slot")
        wanted = 1 if slot < layout.BLK_SLOTS else 2
        limits = message.get("limits")
        if not isinstance(limits, list) or len(limits) != wanted:
            raise Refused(f"limits: a list of {wanted}")
        try:
            parsed = [ratelimit.from_json(limit, f"limits[{i}]") if limit else None
                      for i, limit in enumerate(limits)]
        except ConfigError as error:
            raise Refused(str(error)) from None
        for index, limit in enumerate(parsed):
            backend.attached.page.write(index, limit)
        log.info("broker: %s: limits %s", backend.attached.slot.name, limits)
        return {}

    def _stats(self, message, fds, reply_fds) -> dict:
        """Every disk's and NIC's counters, as its backend keeps them in its page
        (numbers a backend wrote: reported, never acted on)."""
        devices = []
        for slot, backend in sorted(self.backends.items()):
            page = backend.attached.page
            if page is None:
                continue
            disk = slot < layout.BLK_SLOTS
            devices.append({"slot": slot, "device": backend.device,
                            "kind": "disk" if disk else "nic",
                            "counters": page.read_blk() if disk else page.read_net()})
        return {"devices": devices}

    # The supervisor's questions.

    def slot_of(self, child: children.Child) -> Backend | None:
        """The plugged device whose current backend `child` is."""
        for backend in self.backends.values():
            if backend.child is child:
                return backend
        return None

    def respawn(self, slot: int, restarts: int) -> Attached | None:
        """A fresh backend for the device in `slot` whose backend died (None: the slot
        was emptied meanwhile). AttachError or OSError if it cannot be forked."""
        backend = self.backends.get(slot)
        if backend is None or backend.child.status is None:
            return None
        backend.attached = backend.attached.respawn(restarts)
        return backend.attached

    def processes(self) -> list[children.Child]:
        return [b.child for b in [*self.backends.values(), *self.leaving]]

    def released(self) -> list[children.Child]:
        """Backends the vm process let go: they should end by themselves soon (the
        supervisor kills one that does not)."""
        return [b.child for b in self.leaving if b.child.status is None]

    def ended(self, child: children.Child) -> bool:
        """A backend ended; True if that was expected (its device was unplugged)."""
        for backend in self.leaving:
            if backend.child is child:
                self.leaving.remove(backend)
                return True
        return False

    def close(self) -> None:
        for backend in self.backends.values():
            backend.attached.forget()
        for record in [*self.images.values(), *self.taps.values()]:
            os.close(record.fd)
        self.images.clear()
        self.taps.clear()


def _serial(serial) -> str | None:
    """The disk's serial (GET_ID's answer): at most 20 printable ASCII bytes, as -drive's."""
    if serial is None:
        return None
    if not isinstance(serial, str) or len(serial) > 20 or \
            not all(" " <= c <= "~" for c in serial):
        raise Refused("serial: at most 20 printable ASCII characters")
    return serial


def _open_image(path: str, driver, read_only: bool, direct: bool) -> int:
    try:
        probe = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise Refused(f"file.filename: {path}: {error.strerror}") from None
    try:
        st = os.fstat(probe)
    finally:
        os.close(probe)
    kind = _kind(st.st_mode)
    if kind == "symbolic link":
        raise Refused(f"file.filename: {path} is a symbolic link; give the image's own path")
    wanted = {"file": "regular file", "host_device": "block device"}.get(driver, "regular file")
    if kind != wanted:
        hint = {"regular file": "; use file.driver \"file\"",
                "block device": "; use file.driver \"host_device\""}.get(kind, "")
        raise Refused(f"file.filename: {path} is a {kind}, not a {wanted}{hint}")
    flags = block_attach.open_flags(read_only, direct) | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.EINVAL and direct:
            raise Refused(f"cache.direct: the file system of {path} does not support "
                          "O_DIRECT; use \"cache\": {\"direct\": false}") from None
        raise Refused(f"file.filename: {path}: {error.strerror}") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise Refused(f"file.filename: {path} changed while it was being opened")
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
