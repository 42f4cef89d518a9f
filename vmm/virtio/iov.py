"""Scatter/gather over a chain's buffers (lists of memoryviews onto guest memory).

A device that carries a stream (console, vsock) sees its header and payload split
across descriptors however the driver chose: Linux 6.1's vsock puts the 44-byte
header in one descriptor and the payload in the next, newer kernels use one buffer
for both. These helpers let a device read a header, then hand the rest of the chain to
sendmsg/recvmsg_into with no copy.
"""


def skip(views: list[memoryview], offset: int) -> list[memoryview]:
    """The views after the first `offset` bytes."""
    out = []
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        out.append(view[offset:] if offset else view)
        offset = 0
    return out


def take(views: list[memoryview], limit: int) -> list[memoryview]:
    """The views covering at most the first `limit` bytes."""
    out = []
    for view in views:
        if limit <= 0:
            break
        out.append(view[:limit] if len(view) > limit else view)
        limit -= len(out[-1])
    return out


def read(views: list[memoryview], limit: int) -> bytes:
    """A copy of at most the first `limit` bytes (copy a header before checking it:
    the guest may change its buffer while we look)."""
    return b"".join(bytes(view) for view in take(views, limit))


def write(views: list[memoryview], data: bytes) -> int:
    """Copy `data` into the views, in order; how many bytes fitted."""
    done = 0
    for view in views:
        if done == len(data):
            break
        count = min(len(view), len(data) - done)
        view[:count] = data[done:done + count]
        done += count
    return done


def size(views: list[memoryview]) -> int:
    return sum(len(view) for view in views)
