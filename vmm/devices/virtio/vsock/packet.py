"""virtio-vsock packets (virtio 1.2, 5.10.6): the 44-byte little-endian header
struct virtio_vsock_hdr {src_cid u64, dst_cid u64, src_port u32, dst_port u32, len u32,
type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32}, then `len` bytes of payload
(OP_RW only)."""

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size           # 44

HOST_CID = 2                        # VMADDR_CID_HOST: the host, as the guest sees it
TYPE_STREAM = 1                     # SEQPACKET (2) needs VIRTIO_VSOCK_F_SEQPACKET: not offered

OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, \
    OP_CREDIT_REQUEST = range(8)
OP_NAMES = ("INVALID", "REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW", "CREDIT_UPDATE",
            "CREDIT_REQUEST")

SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2  # the sender will receive / send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

MAX_PAYLOAD = 64 << 10              # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: no packet is longer
U32 = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def parse(cls, raw: bytes) -> "Header":
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                           self.type, self.op, self.flags, self.buf_alloc & U32,
                           self.fwd_cnt & U32)

    @property
    def op_name(self) -> str:
        return OP_NAMES[self.op] if self.op < len(OP_NAMES) else f"op {self.op}"
