"""Cutting a QMP client's byte stream into JSON messages, and parsing them, with limits.

Clients need not end messages with newlines (QEMU's JSON streamer does not require them
either): a message is a top-level object or array, found by counting brackets outside
strings. What a hostile or broken client can send is bounded here:

- nesting deeper than MAX_DEPTH (QEMU's limit: 1024) and a message longer than
  MAX_MESSAGE_BYTES are reported once, then the rest of that message is skipped by
  counting brackets alone (nothing is buffered), and the stream goes on after it;
- bytes outside any message that are not whitespace are reported once per run;
- parsing is strict: UTF-8 only, no NaN or Infinity, no number that does not fit a
  64-bit integer or a finite double.

The C parser of `json` recurses once per level and counts against Python's recursion
limit (1000 by default): the limit is raised so that MAX_DEPTH levels parse on any
thread, and the depth limit keeps every parse within it.
"""

import json
import math
import re
import sys
from dataclasses import dataclass

MAX_DEPTH = 1024
sys.setrecursionlimit(max(sys.getrecursionlimit(), 2 * MAX_DEPTH + 200))
MAX_MESSAGE_BYTES = 1 << 20
_OPEN = b"{["
_BLANK = re.compile(rb"[ \t\r\n]*")
_NOISE = re.compile(rb"[^{\[ \t\r\n]*")           # a run of non-JSON at top level
_STRUCTURE = re.compile(rb'[{}\[\]"]')                # what matters inside a message
_STRING_STOP = re.compile(rb'["\\]')                  # what matters inside a string
_INT_LIMIT = 1 << 64


@dataclass(frozen=True)
class Message:
    value: object


@dataclass(frozen=True)
class BadInput:
    desc: str


class _Reject(ValueError):
    pass


def _constant(name: str):
    raise _Reject(f"'{name}' is not a JSON number")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > 20 or not -_INT_LIMIT < (value := int(text)) < _INT_LIMIT:
        raise _Reject(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {text[:24]} is out of range")
    return value


def parse(data: bytes) -> Message | BadInput:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return BadInput(f"JSON parse error, invalid UTF-8 sequence at byte {error.start}")
    try:
        return Message(json.loads(text, parse_constant=_constant, parse_int=_integer,
                                  parse_float=_float))
    except _Reject as error:
        return BadInput(f"JSON parse error, {error}")
    except ValueError as error:          # json.JSONDecodeError, int digit limits
        return BadInput(f"JSON parse error, {error}")
    except RecursionError:               # not reached: the streamer bounds the depth
        return BadInput(f"JSON nesting is deeper than {MAX_DEPTH} levels")


class JsonStream:
    """feed(bytes) -> the Messages and BadInputs completed by those bytes, in order."""

    def __init__(self, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_MESSAGE_BYTES):
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._skipping = False       # the rest of a message already reported as bad
        self._garbage = False        # inside a run of non-JSON bytes at top level

    def feed(self, data: bytes) -> list[Message | BadInput]:
        """Only the bytes that matter are looked at one by one (regular expressions skip
        the rest in C): a client's bytes cost the VM little CPU."""
        out: list[Message | BadInput] = []
        start = 0                    # where the part of `data` not yet buffered begins
        pos, end = 0, len(data)
        while pos < end:
            if self._depth == 0:
                blank = _BLANK.match(data, pos).end()
                if blank > pos:
                    self._garbage = False
                    pos = blank
                    continue
                if data[pos] not in _OPEN:
                    if not self._garbage:
                        self._garbage = True
                        out.append(BadInput(f"JSON parse error, unexpected byte "
                                            f"{data[pos]:#04x} outside a message; expected '{{'"))
                    pos = _NOISE.match(data, pos).end()
                    continue
                self._garbage = False
                start = pos
            elif self._in_string:
                if self._escaped:
                    self._escaped = False
                    pos += 1
                    continue
                found = _STRING_STOP.search(data, pos)
                if found is None:
                    break
                pos = found.start()
                if data[pos] == 0x5C:
                    self._escaped = True
                else:
                    self._in_string = False
                pos += 1
                continue
            else:
                found = _STRUCTURE.search(data, pos)
                if found is None:
                    break
                pos = found.start()
            byte = data[pos]
            pos += 1
            if byte == 0x22:
                self._in_string = True
            elif byte in _OPEN:
                self._depth += 1
                if self._depth > self.max_depth and not self._skipping:
                    out.append(BadInput(f"JSON nesting is deeper than {self.max_depth} "
                                        "levels; the message is ignored"))
                    self._start_skipping()
            else:                                    # a closing bracket
                self._depth -= 1
                if self._depth == 0:
                    if self._skipping:
                        self._skipping = False
                    else:
                        self._buffer += data[start:pos]
                        out.append(parse(bytes(self._buffer)))
                    self._buffer.clear()
                    start = pos
        if self._depth and not self._skipping:
            self._buffer += data[start:]
            if len(self._buffer) > self.max_bytes:
                out.append(BadInput(f"a QMP message is longer than {self.max_bytes} bytes; "
                                    "the message is ignored"))
                self._start_skipping()
        return out

    def _start_skipping(self) -> None:
        self._skipping = True
        self._buffer.clear()
