"""A small AML encoder: the subset of the ACPI Machine Language the DSDT needs.

Terms are bytes; helpers build them (ACPI 6.5, section 20.2). Names are 1..4 characters,
padded with '_'; paths with dots and a leading backslash are encoded as multi-name paths.
"""

import struct

ZERO_OP, ONE_OP, ONES_OP = b"\x00", b"\x01", b"\xff"
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E
STRING_PREFIX = 0x0D
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F
METHOD_OP, IF_OP, LEQUAL_OP, NOTIFY_OP = 0x14, 0xA0, 0x93, 0x86
ARG0_OP = 0x68                   # Arg0..Arg6 are 0x68..0x6E


def pkg_length(body_length: int) -> bytes:
    """PkgLength: the length of itself plus the body, in 1 to 4 bytes."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            encoded = [(extra << 6) | (total & 0xF)]
            encoded += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(encoded)
    raise ValueError("AML package too long")


def name_seg(segment: str) -> bytes:
    if not 1 <= len(segment) <= 4 or not (segment[0].isupper() or segment[0] == "_"):
        raise ValueError(f"bad ACPI name segment {segment!r}")
    return segment.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    prefix = b"\\" if path.startswith("\\") else b""
    segments = [s for s in path.lstrip("\\").split(".") if s]
    encoded = b"".join(name_seg(s) for s in segments)
    if len(segments) == 2:
        encoded = bytes([DUAL_NAME_PREFIX]) + encoded
    elif len(segments) > 2:
        encoded = bytes([MULTI_NAME_PREFIX, len(segments)]) + encoded
    return prefix + encoded


def integer(value: int) -> bytes:
    if value == 0:
        return ZERO_OP
    if value == 1:
        return ONE_OP
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 0xFF), (WORD_PREFIX, "<H", 0xFFFF),
                               (DWORD_PREFIX, "<I", 0xFFFF_FFFF)):
        if value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """A compressed EISA id such as PNP0A06, as a DWORD integer."""
    vendor = [ord(c) - 0x40 for c in text[:3]]
    packed = (vendor[0] << 26 | vendor[1] << 21 | vendor[2] << 16 | int(text[3:], 16))
    return integer(int.from_bytes(packed.to_bytes(4, "big"), "little"))


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False) -> bytes:
    """DefMethod: MethodFlags are ArgCount (bits 0-2), SerializeFlag (bit 3), SyncLevel 0."""
    if not 0 <= arg_count <= 7:
        raise ValueError(f"a method takes 0..7 arguments, not {arg_count}")
    flags = arg_count | (0x08 if serialized else 0)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def if_(predicate: bytes, *terms: bytes) -> bytes:
    """DefIfElse without an Else: If (predicate) { terms }."""
    body = predicate + b"".join(terms)
    return bytes([IF_OP]) + pkg_length(len(body)) + body


def lequal(left: bytes, right: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + left + right


def arg(index: int) -> bytes:
    """ArgObj: a method's argument Arg0..Arg6."""
    if not 0 <= index <= 6:
        raise ValueError(f"Arg{index}: methods have Arg0..Arg6")
    return bytes([ARG0_OP + index])


def notify(path: str, value: int) -> bytes:
    """DefNotify: Notify (path, value), path naming a device (a SuperName)."""
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


# Resource descriptors (ACPI 6.5, section 6.4), for _CRS buffers.
def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def interrupt(irq: int, edge: bool = True, active_low: bool = False) -> bytes:
    """Extended Interrupt Descriptor: one interrupt, consumer, exclusive."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, irq)


def io_port(base: int, length: int) -> bytes:
    """I/O Port Descriptor: a fixed range, 16-bit decode."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def irq(line: int) -> bytes:
    """IRQ Descriptor (no flags: edge-triggered, active high) for an ISA IRQ 0..15."""
    return struct.pack("<BH", 0x22, 1 << line)


def resource_template(*descriptors: bytes) -> bytes:
    end = b"\x79\x00"          # End Tag, checksum 0 (treated as valid)
    return buffer(b"".join(descriptors) + end)
