"""A vhost-user backend: the protocol's state machine and one worker thread per ring.

The device (e.g. vmm/devices/virtio/block) supplies features, its configuration space
and a `process(queue)` that consumes available chains; this module does the rest:
negotiation, the memory table, ring setup and teardown, kicks and calls.

process() may return a Served (vmm/virtio/queue.py): whether to interrupt the driver,
and whether chains may remain because the device stopped at a budget (the worker then
looks at its stop pipe without waiting and calls again) or gave one back to wait
(virtio-rng's rate limit: the worker calls again after `retry_in` or at a kick). A process() that returns None
consumed everything, and the worker asks the queue whether to interrupt.

A device may take over the worker's whole loop instead, in C where the loop is hot:
`serve(queue, kick, call, stop)` serves, interrupts through `call`, waits on `kick`,
and returns once the `stop` fd is readable (QueueBroken for a malformed ring). The
virtio-blk device does (native/blkio.c, blk_serve). The fds stay open while it runs:
SET_VRING_KICK/CALL on a running ring stop its worker first and restart it after.

A device with several queues tells them apart by `queue.index` (the ring's number,
set here). A device that must act on a ring for a reason other than the driver's kick
(console input or a vsock stream became readable: something to put in the receive
queue) has `wake_fds`, one eventfd per queue (-1 for none), which it owns and writes;
the ring's worker waits on it as on the kick and then calls process() again.

A device that must know the driver's features (virtio-net: the header size, the
tap's offloads) has `set_features(features)`, called at SET_FEATURES, before the
rings start.

A device whose requests must survive its backend's death (virtio-blk: a write the
guest is waiting for) sets `tracks_inflight = True`: the backend then offers
INFLIGHT_SHMFD, makes the region at GET_INFLIGHT_FD and, once the frontend hands it
back with SET_INFLIGHT_FD, has the ring walker record every chain it pops until its
completion is published (native/virtq.h, vq_inflight_start). A ring started with a
region a previous backend used resubmits what that one left in flight, oldest first,
before anything new. The devices that complete in Python, in order, as they pop (net,
console, vsock) do not track.

A guest drives this process through its frontend: what it gets wrong here (a broken
ring, a request the device refuses) is logged through vmm/log_limit.py, as the
process's own device ("").
"""

import fcntl
import logging
import math
import mmap
import os
import select
import threading
from typing import Protocol

from .._virtq import ffi
from ..log_limit import guest
from ..virtio.queue import INFLIGHT_MAX_QUEUE, QueueBroken, Served, Virtqueue, inflight_queue_bytes
from . import protocol as P
from .memory import GuestRam

log = logging.getLogger(__name__)

PROTOCOL_FEATURES = (1 << P.PROTOCOL_F_MQ) | (1 << P.PROTOCOL_F_REPLY_ACK) | (1 << P.PROTOCOL_F_CONFIG)
INFLIGHT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class Device(Protocol):
    features: int
    num_queues: int
    max_queue_size: int

    def config(self) -> bytes: ...
    def process(self, queue: Virtqueue) -> Served | None: ...


class Vring:
    """One virtqueue as the frontend set it up, and its worker once started."""

    def __init__(self, index: int):
        self.index = index
        self.num = 0
        self.base = 0
        self.addresses: tuple[int, int, int] | None = None     # desc, avail, used (user)
        self.kick = -1
        self.call = -1
        self.enabled = False
        self.inflight: tuple[int, int] | None = None   # its part of the region: address, queue size
        self.queue: Virtqueue | None = None
        self._thread: threading.Thread | None = None
        self._stop_read, self._stop_write = -1, -1

    def replace_fd(self, name: str, fd: int) -> None:
        old = getattr(self, name)
        if old >= 0:
            os.close(old)
        setattr(self, name, fd)

    def start(self, device: Device, ram: GuestRam, event_idx: bool = False) -> None:
        """event_idx: VIRTIO_RING_F_EVENT_IDX was negotiated (the device offered it and
        the frontend set it): interrupts follow used_event, kicks avail_event."""
        desc, avail, used = (ram.guest_address(a) for a in self.addresses)
        queue = Virtqueue(ram.table(), self.num, desc, avail, used, self.base)
        queue.index = self.index
        queue.event_idx = event_idx
        if self.inflight is not None:
            resubmitted = queue.track_inflight(*self.inflight)
            if resubmitted:
                log.info("ring %d: %d requests a previous backend left in flight are "
                         "resubmitted", self.index, resubmitted)
        self.queue = queue
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._run, args=(device,),
                                        name=f"vring{self.index}", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop the worker; the next available index (GET_VRING_BASE's answer)."""
        if self._thread:
            os.write(self._stop_write, b"x")
            self._thread.join()
            os.close(self._stop_read)
            os.close(self._stop_write)
            self._thread = None
        if self.queue is not None:
            self.base = self.queue.last_avail_idx
            self.queue = None
        return self.base

    def close(self) -> None:
        self.stop()
        self.replace_fd("kick", -1)
        self.replace_fd("call", -1)

    def _run(self, device: Device) -> None:
        serve = getattr(device, "serve", None)
        if serve is not None:
            try:
                serve(self.queue, self.kick, self.call, self._stop_read)
            except (QueueBroken, OSError) as error:
                guest.error(log, "", "broken ring", "ring %d: the device stops serving it: %s",
                            self.index, error)
            return
        poller = select.poll()
        poller.register(self.kick, select.POLLIN)
        poller.register(self._stop_read, select.POLLIN)
        wake_fds = getattr(device, "wake_fds", ())
        wake = wake_fds[self.index] if self.index < len(wake_fds) else -1
        if wake >= 0:
            poller.register(wake, select.POLLIN)
        while True:
            # Serve what is already there first: the driver may have queued requests
            # before we were started, without a kick we will ever see.
            try:
                served = device.process(self.queue)
            except QueueBroken as error:
                guest.error(log, "", "broken ring", "ring %d is broken, the device stops "
                            "serving it: %s", self.index, error)
                return
            if served is None:
                served = Served(self.queue.needs_interrupt(), False)
            if served.notify and self.call >= 0:
                os.eventfd_write(self.call, 1)
            if not served.more and served.retry_in is None and self.queue.event_idx:
                # avail_event moves on, or the driver would not kick again; then one
                # more look, for chains made available before it could see that.
                self.queue.want_notifications()
                if self.queue.pending():
                    continue
            events = dict(poller.poll(_timeout_ms(served)))
            if self._stop_read in events:
                return
            if self.kick in events:
                os.eventfd_read(self.kick)
            if wake in events:
                os.eventfd_read(wake)


def _timeout_ms(served: Served) -> int | None:
    """How long the worker may wait for a kick before it calls process() again."""
    if served.more:
        return 0
    if served.retry_in is None:
        return None
    return max(1, math.ceil(served.retry_in * 1000))


class Backend:
    def __init__(self, device: Device, connection: P.Connection):
        self.device = device
        self.connection = connection
        self.features = 0
        self.protocol_features = 0
        self.ram: GuestRam | None = None
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.tracks_inflight = bool(getattr(device, "tracks_inflight", False))
        self.offered_protocol_features = PROTOCOL_FEATURES | \
            ((1 << P.PROTOCOL_F_INFLIGHT_SHMFD) if self.tracks_inflight else 0)
        self.inflight: mmap.mmap | None = None
        self._inflight_entries = min(device.max_queue_size, INFLIGHT_MAX_QUEUE)

    def serve(self) -> None:
        """Until the frontend disconnects."""
        try:
            while (message := self.connection.receive()) is not None:
                try:
                    answer = self._handle(message)
                    failed = False
                except P.ProtocolError as error:
                    guest.error(log, "", "refused request", "%s: %s", message.name, error)
                    answer, failed = None, True
                if isinstance(answer, tuple):           # a reply that carries fds
                    try:
                        self.connection.reply(message, *answer)
                    finally:
                        P._close(answer[1])
                elif answer is not None:
                    self.connection.reply(message, answer)
                elif message.flags & P.FLAG_NEED_REPLY and self._acked():
                    self.connection.reply(message, P.U64.pack(1 if failed else 0))
                elif failed:
                    raise P.ProtocolError(f"{message.name} failed")
        finally:
            for vring in self.vrings:
                vring.close()
            if self.ram:
                self.ram.close()
            if self.inflight:
                self.inflight.close()

    def _acked(self) -> bool:
        return bool(self.protocol_features & (1 << P.PROTOCOL_F_REPLY_ACK))

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise P.ProtocolError(f"no ring {index}")
        return self.vrings[index]

    def _handle(self, m: P.Message) -> bytes | tuple[bytes, tuple[int, ...]] | None:
        """The reply payload for requests that have one (with the fds it carries, which
        are closed once sent), else None."""
        r = m.request
        keeps_fds = (P.SET_MEM_TABLE, P.SET_VRING_KICK, P.SET_VRING_CALL, P.SET_VRING_ERR) + \
            ((P.SET_INFLIGHT_FD,) if self.tracks_inflight else ())
        if r not in keeps_fds:
            P._close(m.fds)
        if r == P.GET_FEATURES:
            return P.U64.pack(self.device.features | P.F_PROTOCOL_FEATURES)
        if r == P.SET_FEATURES:
            self.features = m.u64()
            set_features = getattr(self.device, "set_features", None)
            if set_features:
                try:
                    set_features(self.features & ~P.F_PROTOCOL_FEATURES)
                except OSError as error:
                    raise P.ProtocolError(f"the device refused the features: {error}") from None
        elif r == P.GET_PROTOCOL_FEATURES:
            return P.U64.pack(self.offered_protocol_features)
        elif r == P.SET_PROTOCOL_FEATURES:
            self.protocol_features = m.u64() & self.offered_protocol_features
        elif r == P.GET_QUEUE_NUM:
            return P.U64.pack(self.device.num_queues)
        elif r in (P.SET_OWNER, P.RESET_OWNER):
            pass
        elif r == P.SET_MEM_TABLE:
            for vring in self.vrings:
                vring.stop()
            if self.ram:
                self.ram.close()
            self.ram = GuestRam(P.parse_mem_table(m.payload), m.fds)
            self._start_ready()
        elif r == P.SET_VRING_NUM:
            index, num = m.vring_state()
            if not 1 <= num <= self.device.max_queue_size or num & (num - 1):
                raise P.ProtocolError(f"ring {index}: size {num}")
            self._vring(index).num = num
        elif r == P.SET_VRING_ADDR:
            if len(m.payload) < P.VRING_ADDR.size:
                raise P.ProtocolError("SET_VRING_ADDR: short payload")
            index, _, desc, used, avail, _ = P.VRING_ADDR.unpack_from(m.payload)
            self._vring(index).addresses = (desc, avail, used)
        elif r == P.SET_VRING_BASE:
            index, base = m.vring_state()
            self._vring(index).base = base
        elif r == P.GET_VRING_BASE:
            index, _ = m.vring_state()
            vring = self._vring(index)
            base = vring.stop()
            vring.replace_fd("kick", -1)
            return P.VRING_STATE.pack(index, base)
        elif r in (P.SET_VRING_KICK, P.SET_VRING_CALL, P.SET_VRING_ERR):
            value = m.u64()
            fd = -1 if value & P.VRING_NOFD or not m.fds else m.fds[0]
            vring = self._vring(value & P.VRING_INDEX_MASK)
            if r == P.SET_VRING_ERR:
                if fd >= 0:
                    os.close(fd)
                return None
            # A running worker waits on the kick fd and writes the call fd: it stops
            # before either is closed under it, and starts again where it stopped.
            running = vring.queue is not None
            if running:
                vring.stop()
            vring.replace_fd("kick" if r == P.SET_VRING_KICK else "call", fd)
            if r == P.SET_VRING_KICK:
                # Without protocol features a ring starts on its kick fd.
                vring.enabled |= not self.features & P.F_PROTOCOL_FEATURES
            if running or r == P.SET_VRING_KICK:
                self._start_ready()
        elif r == P.SET_VRING_ENABLE:
            index, enable = m.vring_state()
            vring = self._vring(index)
            vring.enabled = bool(enable)
            if not enable:
                vring.stop()
            self._start_ready()
        elif r == P.GET_CONFIG:
            if len(m.payload) < P.CONFIG_HEADER.size:
                raise P.ProtocolError("GET_CONFIG: short payload")
            offset, size, flags = P.CONFIG_HEADER.unpack_from(m.payload)
            config = self.device.config()
            data = config[offset:offset + size].ljust(size, b"\0")
            return P.CONFIG_HEADER.pack(offset, size, flags) + data
        elif r == P.SET_CONFIG:
            pass    # the block device's configuration is read-only (no CONFIG_WCE)
        elif r == P.GET_MAX_MEM_SLOTS:
            return P.U64.pack(P.MAX_FDS)
        elif r == P.GET_INFLIGHT_FD and self.tracks_inflight:
            return self._new_inflight_region(m)
        elif r == P.SET_INFLIGHT_FD and self.tracks_inflight:
            self._set_inflight_region(m)
        else:
            raise P.ProtocolError(f"unsupported request {m.name}")
        return None

    def _inflight_bytes(self, region: P.Inflight) -> int:
        """What a region for these queues needs; ProtocolError for sizes we do not serve.
        Each queue's part has an entry for every descriptor of the device's largest ring,
        whatever queue size the frontend names: QEMU's virtio-mmio lets the driver pick
        rings of up to 1024 descriptors whatever its queue-size (128 by default), and a
        ring the part cannot cover could not be tracked."""
        if not 1 <= region.num_queues <= len(self.vrings):
            raise P.ProtocolError(f"{region.num_queues} queues; the device has {len(self.vrings)}")
        if not 1 <= region.queue_size <= self._inflight_entries:
            raise P.ProtocolError(f"queue size {region.queue_size}; allowed "
                                  f"1..{self._inflight_entries}")
        return region.num_queues * inflight_queue_bytes(self._inflight_entries)

    def _new_inflight_region(self, m: P.Message) -> tuple[bytes, tuple[int, ...]]:
        """GET_INFLIGHT_FD: a new memfd for the queues' parts (zeroes: every part is
        fresh; sized as _inflight_bytes says), sealed so that it can neither shrink under
        a mapping nor grow, and handed to the frontend, which keeps it. We map it when it comes back with
        SET_INFLIGHT_FD. A request we cannot serve gets a region of size 0 and no fd,
        which QEMU takes as "no inflight tracking"."""
        try:
            asked = m.inflight()
            size = self._inflight_bytes(asked)
            fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, INFLIGHT_SEALS)
            except OSError:
                os.close(fd)
                raise
        except (P.ProtocolError, OSError) as error:
            log.error("GET_INFLIGHT_FD: no region: %s", error)
            return P.Inflight(-1, 0, 0, 0, 0).pack(), ()
        return P.Inflight(fd, size, 0, asked.num_queues, asked.queue_size).pack(), (fd,)

    def _set_inflight_region(self, m: P.Message) -> None:
        """SET_INFLIGHT_FD: map the region the frontend kept and give each ring its part
        from its next start on (running rings stop and start again). Checked before it
        is mapped: the sizes against what the parts need, and the memfd sealed against
        shrinking and large enough, since a file that shrank under the mapping would
        fault us on the next access."""
        try:
            if len(m.fds) != 1:
                raise P.ProtocolError(f"{len(m.fds)} fds, 1 expected")
            region = m.inflight()
            size = self._inflight_bytes(region)
            if region.mmap_size < size:
                raise P.ProtocolError(f"a region of {region.mmap_size} bytes; "
                                      f"{region.num_queues} queues need {size}")
            fd = m.fds[0]
            if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                raise P.ProtocolError("the region is not sealed against shrinking")
            if os.fstat(fd).st_size < region.mmap_offset + size:
                raise P.ProtocolError("the region's file is smaller than the region")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=region.mmap_offset)
        except (OSError, ValueError, OverflowError) as error:
            raise P.ProtocolError(f"cannot map the region: {error}") from None
        finally:
            P._close(m.fds)
        for vring in self.vrings:
            vring.stop()
        if self.inflight:
            self.inflight.close()
        self.inflight = mapping
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(mapping)))
        part = inflight_queue_bytes(self._inflight_entries)
        for vring in self.vrings:
            vring.inflight = (base + vring.index * part, self._inflight_entries) \
                if vring.index < region.num_queues else None
        self._start_ready()

    def _start_ready(self) -> None:
        for vring in self.vrings:
            if (vring.queue is None and vring.enabled and vring.kick >= 0 and self.ram
                    and vring.addresses and vring.num):
                try:
                    vring.start(self.device, self.ram,
                                bool(self.features & self.device.features & P.F_EVENT_IDX))
                except (ValueError, P.ProtocolError) as error:
                    # Rings outside guest RAM: that queue stays dead, the backend lives.
                    guest.error(log, "", "misprogrammed queue", "ring %d cannot start: %s",
                                vring.index, error)
