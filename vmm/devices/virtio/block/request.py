"""One descriptor chain -> one validated virtio-blk request, executed against the disk.

A chain is: a 16-byte header (type, reserved, sector) in device-readable buffers, then
data (readable for writes, writable for reads), then one writable status byte. Anything
else -- a short header, no status byte, data that is not a whole number of sectors, a
range past the end of the disk, a write to a read-only disk -- completes with an error
status; the guest gets an error, never a crash of the backend.
"""

import mmap
import os
import struct

from ...._kvm import ffi
from ....virtio.queue import Chain

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HEADER = struct.Struct("<IIQ")
SECTOR = 512
ID_BYTES = 20


def _take(buffers: list[memoryview], count: int) -> tuple[bytes, list[memoryview]]:
    """The first `count` bytes of a scattered buffer, and the views that remain."""
    taken, rest = b"", list(buffers)
    while rest and len(taken) < count:
        head = rest.pop(0)
        need = count - len(taken)
        taken += bytes(head[:need])
        if len(head) > need:
            rest.insert(0, head[need:])
    return taken, rest


def _split_status(writable: list[memoryview]) -> tuple[list[memoryview], memoryview | None]:
    """The data views, and the last writable byte, which holds the status."""
    if not writable:
        return [], None
    last = writable[-1]
    data = writable[:-1] + ([last[:-1]] if len(last) > 1 else [])
    return data, last[len(last) - 1:]


def execute(device, chain: Chain) -> int:
    """Runs the request; returns the number of bytes written into the chain."""
    data_out, status = _split_status(chain.writable)
    if status is None:
        return 0                           # nowhere to put a status: nothing to report
    header, data_in = _take(chain.readable, HEADER.size)
    written = 1
    if len(header) < HEADER.size:
        code = S_IOERR
    else:
        kind, _, sector = HEADER.unpack(header)
        code, written = _run(device, kind, sector, data_in, data_out)
    status[0] = code
    return written


def _run(device, kind: int, sector: int, data_in, data_out) -> tuple[int, int]:
    if kind == T_IN:
        length = sum(len(v) for v in data_out)
        if not _in_range(device, sector, length):
            return S_IOERR, 1
        try:
            done = _read(device, data_out, sector * SECTOR, length)
        except OSError:
            return S_IOERR, 1
        return (S_OK if done == length else S_IOERR), length + 1
    if kind == T_OUT:
        length = sum(len(v) for v in data_in)
        if device.read_only or not _in_range(device, sector, length):
            return S_IOERR, 1
        try:
            done = _write(device, data_in, sector * SECTOR, length)
        except OSError:
            return S_IOERR, 1
        return (S_OK if done == length else S_IOERR), 1
    if kind == T_FLUSH:
        try:
            os.fdatasync(device.fd)
        except OSError:
            return S_IOERR, 1
        return S_OK, 1
    if kind == T_GET_ID:
        ident = device.serial[:ID_BYTES].ljust(ID_BYTES, b"\0")
        copied = 0
        for view in data_out:
            count = min(len(view), ID_BYTES - copied)
            view[:count] = ident[copied:copied + count]
            copied += count
        return S_OK, copied + 1
    return S_UNSUPP, 1


def _in_range(device, sector: int, length: int) -> bool:
    return length % SECTOR == 0 and sector + length // SECTOR <= device.capacity


def _aligned(views, offset: int) -> bool:
    """What O_DIRECT needs: sector-aligned file offset, buffer addresses and lengths."""
    return offset % SECTOR == 0 and all(
        len(v) % SECTOR == 0 and int(ffi.cast("uintptr_t", ffi.from_buffer(v))) % SECTOR == 0
        for v in views)


def _read(device, views, offset: int, length: int) -> int:
    if not device.direct or _aligned(views, offset):
        return _all(os.preadv, device.fd, views, offset)
    bounce = _bounce(length)
    done = _all(os.preadv, device.fd, [memoryview(bounce)[:length]], offset)
    position = 0
    for view in views:
        view[:] = bounce[position:position + len(view)]
        position += len(view)
    return done


def _write(device, views, offset: int, length: int) -> int:
    if not device.direct or _aligned(views, offset):
        return _all(os.pwritev, device.fd, views, offset)
    bounce = _bounce(length)
    position = 0
    for view in views:
        bounce[position:position + len(view)] = view
        position += len(view)
    return _all(os.pwritev, device.fd, [memoryview(bounce)[:length]], offset)


def _bounce(length: int) -> mmap.mmap:
    """A page-aligned buffer (anonymous mmap) for guest buffers O_DIRECT cannot use."""
    return mmap.mmap(-1, max(length, 1))


def _all(call, fd: int, views, offset: int) -> int:
    """preadv/pwritev until done or end of file (short transfers are legal)."""
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        count = call(fd, _skip(views, done), offset + done)
        if count <= 0:
            break
        done += count
    return done


def _skip(views, count: int) -> list[memoryview]:
    rest = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        rest.append(view[count:])
        count = 0
    return rest
