"""The QMP schema: every command's arguments, declared once, and the checks that run
before any handler sees them (as QEMU's QAPI does).

A command's arguments are an Object: each member has a type and is required unless
declared optional. Types: Str, Pattern, Bool, OnOff (a qdev flag), Int (a range), Enum (allowed strings), List,
Object (nested members), Any. Checking an object reports, in QEMU's words,
- a member not declared: "Parameter 'x' is unexpected",
- a value of the wrong type: "Invalid parameter type for 'x', expected: T",
- a required member that is absent: "Parameter 'x' is missing",
- a value outside what the type allows: "Parameter 'x' ... (allowed ...)",
with nested members named by their path ('file.filename'). A handler gets the checked
arguments as a plain dict, defaults filled in, and never parses JSON itself.
"""

import re
from dataclasses import dataclass, field


class SchemaError(Exception):
    """The arguments do not fit the schema; the message is the QMP error's desc."""


class Type:
    """check(value, path) -> the checked value, or SchemaError naming `path`."""
    name = "value"

    def check(self, value, path: str):
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Type):
    max_length: int = 4096
    name = "string"

    def check(self, value, path):
        if not isinstance(value, str):
            raise SchemaError(f"Invalid parameter type for '{path}', expected: string")
        if len(value) > self.max_length:
            raise SchemaError(f"Parameter '{path}' is longer than {self.max_length} characters")
        return value


@dataclass(frozen=True)
class Pattern(Type):
    """A string matching `regex` whole, of min..max characters; `what` says what it is."""
    regex: str
    low: int
    high: int
    what: str
    name = "string"

    def check(self, value, path):
        Str().check(value, path)
        if not (self.low <= len(value) <= self.high and re.fullmatch(self.regex, value)):
            raise SchemaError(f"Parameter '{path}' expects {self.what}")
        return value


@dataclass(frozen=True)
class Bool(Type):
    name = "boolean"

    def check(self, value, path):
        if not isinstance(value, bool):
            raise SchemaError(f"Invalid parameter type for '{path}', expected: boolean")
        return value


class OnOff(Type):
    """A qdev property flag: a JSON boolean, or the strings "on"/"off" QEMU's device_add
    also takes (Kata sends "share-rw": "on")."""
    name = "boolean"
    WORDS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}

    def check(self, value, path):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in self.WORDS:
            return self.WORDS[value]
        raise SchemaError(f"Invalid parameter type for '{path}', expected: boolean "
                          "(true, false, \"on\" or \"off\")")


@dataclass(frozen=True)
class Int(Type):
    low: int = -(1 << 63)
    high: int = (1 << 63) - 1
    name = "integer"

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"Invalid parameter type for '{path}', expected: integer")
        if not self.low <= value <= self.high:
            raise SchemaError(f"Parameter '{path}' is {value}; allowed {self.low}..{self.high}")
        return value


@dataclass(frozen=True)
class Enum(Type):
    values: tuple[str, ...]
    name = "string"

    def check(self, value, path):
        Str().check(value, path)
        if value not in self.values:
            allowed = ", ".join(self.values) or "none"
            raise SchemaError(f"Parameter '{path}' does not accept value '{value[:64]}'; "
                              f"allowed: {allowed}")
        return value


@dataclass(frozen=True)
class List(Type):
    items: Type
    max_items: int = 64
    name = "array"

    def check(self, value, path):
        if not isinstance(value, list):
            raise SchemaError(f"Invalid parameter type for '{path}', expected: array")
        if len(value) > self.max_items:
            raise SchemaError(f"Parameter '{path}' has {len(value)} items; allowed at most "
                              f"{self.max_items}")
        return [self.items.check(item, f"{path}[{i}]") for i, item in enumerate(value)]


@dataclass(frozen=True)
class Member:
    type: Type
    optional: bool = False
    default: object = None


@dataclass(frozen=True)
class Object(Type):
    members: dict[str, Member] = field(default_factory=dict)
    name = "object"

    def check(self, value, path=""):
        if not isinstance(value, dict):
            raise SchemaError(f"Invalid parameter type for '{path or 'arguments'}', "
                              "expected: object")
        for key in value:
            if key not in self.members:
                raise SchemaError(f"Parameter '{_join(path, key)}' is unexpected")
        checked = {}
        for key, member in self.members.items():
            if key in value:
                checked[key] = member.type.check(value[key], _join(path, key))
            elif member.optional:
                if member.default is not None:
                    checked[key] = member.default
            else:
                raise SchemaError(f"Parameter '{_join(path, key)}' is missing")
        return checked


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def req(type_: Type) -> Member:
    return Member(type_)


def opt(type_: Type, default=None) -> Member:
    return Member(type_, optional=True, default=default)
