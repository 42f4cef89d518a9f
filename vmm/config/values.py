"""Parsers for the value syntaxes of the command line, shared checks on raw text.

Each parser takes the text and the `where` of the option it came from, and either
returns a typed value or raises ConfigError naming that option.
"""

import json
import re

from . import limits as L
from .errors import ConfigError
from .limits import KiB, MiB, GiB

_SIZE = re.compile(r"^([0-9]+)\s*([A-Za-z]*)$")
_UNITS = {
    "": 1,
    "k": KiB, "kib": KiB,
    "m": MiB, "mib": MiB,
    "g": GiB, "gib": GiB,
}
SIZE_HELP = ("a whole number of bytes, or with a suffix K/KiB, M/MiB, G/GiB "
             "(either case, powers of 1024)")


def show(value) -> str:
    """Quote a user-supplied value for a message: control characters escaped."""
    if isinstance(value, (str, bool)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def human_size(size: int) -> str:
    """Bytes as the largest unit that divides them: `128 MiB`, `512 bytes`."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def memory_out_of_range(size: int, where: str, hint: str = "") -> ConfigError:
    """The one message for memory out of range; each command-line form adds its own hint
    about units, since each reads a plain -m number differently."""
    low, high = L.MEM_SIZE
    return ConfigError(where, f"{human_size(size)} of memory is out of range",
                       f"allowed {human_size(low)}..{human_size(high)}{hint}")


def check_text(value: str, where: str) -> str:
    """Refuse text the host cannot pass to the kernel: NUL bytes, lone surrogates."""
    if "\0" in value:
        raise ConfigError(where, f"{show(value)} contains a NUL character", "remove it")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ConfigError(where, f"{show(value)} is not valid text",
                          "use UTF-8 characters") from None
    return value


def parse_size(text: str, where: str) -> int:
    """Memory sizes: plain bytes, or K/M/G with or without `iB`, in any case."""
    match = _SIZE.match(text.strip())
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ConfigError(where, f"{show(text)} is not a size", SIZE_HELP)
    return int(match.group(1)) * unit


def parse_smp(text: str, where: str) -> int:
    """-smp N or -smp cpus=N (both forms): the microVM has no sockets or cores."""
    count = text[len("cpus="):] if text.startswith("cpus=") else text
    if count.isascii() and count.isdigit():
        return int(count)
    raise ConfigError(where, f"{show(text)} is not a vCPU count",
                      f"write -smp N or -smp cpus=N, N in {L.VCPUS[0]}..{L.VCPUS[1]}")


def parse_serial(text: str, where: str) -> bool:
    if text != "stdio":
        raise ConfigError(where, f"{show(text)} is not supported", "the only serial backend is stdio")
    return True


def parse_int(text: str, where: str) -> int:
    """Decimal, or hexadecimal with 0x."""
    stripped = text.strip()
    try:
        if stripped.lower().startswith("0x"):
            return int(stripped[2:], 16)
        if stripped.isascii() and stripped.isdigit():
            return int(stripped, 10)
    except ValueError:
        pass
    raise ConfigError(where, f"{show(text)} is not a whole number",
                      "give a decimal number, or hexadecimal with 0x")


_TRUE = ("true", "on", "yes")
_FALSE = ("false", "off", "no")


def parse_bool(text: str, where: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(where, f"{show(text)} is not a boolean", "use true or false (on/off)")


def split_properties(text: str, where: str) -> list[tuple[str, str | None]]:
    """Split `a=1,b=2,word` into pairs; `,,` stands for a literal comma (QEMU's rule).

    A bare word gives (word, None). Keys must be unique.
    """
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))

    pairs, seen = [], set()
    for part in parts:
        if not part:
            raise ConfigError(where, f"empty property in {show(text)}",
                              "write key=value pairs separated by single commas")
        key, sep, value = part.partition("=")
        if key in seen:
            raise ConfigError(where, f"{key}= given twice", "give each property once")
        seen.add(key)
        pairs.append((key, value if sep else None))
    return pairs


def kind_of(value) -> str:
    """What a JSON value is, for messages: `is a string`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a fractional number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
