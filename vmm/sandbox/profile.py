"""Seccomp profiles: one OCI runtime-spec `linux.seccomp` JSON document per role in
seccomp_profiles/, loaded and checked strictly, so a typo in a profile is an error at
load time rather than a rule that silently does nothing.

Accepted: defaultAction, defaultErrnoRet, architectures (x86_64 only), syscalls[] of
{names, action, errnoRet, args[{index, value, valueTwo, op}], comment}, and our one
extension, `comment`, on the document and on every entry (required on entries: each
rule says why its role needs it). Anything else is rejected with the path to it.
"""

import json
from dataclasses import dataclass, field

from .profile_dir import PROFILE_DIR, roles

# libseccomp's names; their values are pyseccomp's (seccomp.py), imported only to
# compile a filter.
ACTIONS = ("SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
           "SCMP_ACT_ERRNO", "SCMP_ACT_LOG", "SCMP_ACT_ALLOW")
OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
       "SCMP_CMP_MASKED_EQ")
ARCH = "SCMP_ARCH_X86_64"
_DOC_KEYS = {"comment", "defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
_RULE_KEYS = {"names", "action", "errnoRet", "args", "comment"}
_ARG_KEYS = {"index", "value", "valueTwo", "op"}


class ProfileError(Exception):
    """A profile that cannot be used; the message names the file and the place."""


@dataclass(frozen=True)
class Arg:
    index: int
    op: str
    value: int
    value_two: int


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    action: str
    errno: int | None
    args: tuple[Arg, ...]
    comment: str
    numbers: tuple[int, ...]          # of names, on x86_64


@dataclass(frozen=True)
class Profile:
    role: str
    comment: str
    default_action: str
    default_errno: int | None
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def syscalls(self) -> set[str]:
        return {name for rule in self.rules for name in rule.names}


def load(role: str) -> Profile:
    path = PROFILE_DIR / f"{role}.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile for role {role!r} (roles: {', '.join(roles())})") from None
    except (OSError, ValueError) as error:
        raise ProfileError(f"{path}: {error}") from None
    return parse(role, document, str(path))


def parse(role: str, document, where: str = "<profile>") -> Profile:
    _object(document, _DOC_KEYS, where)
    default = _action(document.get("defaultAction"), f"{where}: defaultAction")
    default_errno = _errno(document, default, "defaultErrnoRet", where)
    architectures = document.get("architectures", [ARCH])
    if architectures != [ARCH]:
        raise ProfileError(f"{where}: architectures must be [{ARCH!r}], not {architectures!r}")
    entries = document.get("syscalls")
    if not isinstance(entries, list) or not entries:
        raise ProfileError(f"{where}: syscalls must be a non-empty list")
    rules = tuple(_rule(entry, f"{where}: syscalls[{i}]") for i, entry in enumerate(entries))
    return Profile(role, str(document.get("comment", "")), default, default_errno, rules)


def _rule(entry, where: str) -> Rule:
    _object(entry, _RULE_KEYS, where)
    names = entry.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ProfileError(f"{where}: names must be a non-empty list of syscall names")
    import pyseccomp
    numbers = []
    for name in names:
        number = pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, name)
        if number < 0:
            raise ProfileError(f"{where}: {name!r} is not an x86_64 syscall")
        numbers.append(number)
    action = _action(entry.get("action"), f"{where}: action")
    comment = entry.get("comment")
    if not isinstance(comment, str) or not comment.strip():
        raise ProfileError(f"{where} ({' '.join(names)}): every entry needs a comment saying why")
    raw_args = entry.get("args", [])
    if not isinstance(raw_args, list) or len(raw_args) > 6:
        raise ProfileError(f"{where}: args must be a list of at most 6 conditions")
    args = tuple(_arg(a, f"{where}: args[{i}]") for i, a in enumerate(raw_args))
    return Rule(tuple(names), action, _errno(entry, action, "errnoRet", where), args,
                comment, tuple(numbers))


def _arg(arg, where: str) -> Arg:
    _object(arg, _ARG_KEYS, where)
    index, value, two, op = (arg.get(k) for k in ("index", "value", "valueTwo", "op"))
    if not isinstance(index, int) or not 0 <= index <= 5:
        raise ProfileError(f"{where}: index must be 0..5")
    if op not in OPS:
        raise ProfileError(f"{where}: unknown op {op!r} (one of {', '.join(OPS)})")
    for name, number in (("value", value), ("valueTwo", 0 if two is None else two)):
        if not isinstance(number, int) or not 0 <= number < 1 << 64:
            raise ProfileError(f"{where}: {name} must be an unsigned 64-bit integer")
    return Arg(index, op, value, two or 0)


def _object(thing, keys: set[str], where: str) -> None:
    if not isinstance(thing, dict):
        raise ProfileError(f"{where}: must be an object")
    unknown = sorted(set(thing) - keys)
    if unknown:
        raise ProfileError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(keys))})")


def _action(action, where: str) -> str:
    if action not in ACTIONS:
        raise ProfileError(f"{where}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
    return action


def _errno(entry: dict, action: str, key: str, where: str) -> int | None:
    errno = entry.get(key)
    if action == "SCMP_ACT_ERRNO":
        if not isinstance(errno, int) or not 0 < errno < 4096:
            raise ProfileError(f"{where}: SCMP_ACT_ERRNO needs {key} (1..4095)")
        return errno
    if errno is not None:
        raise ProfileError(f"{where}: {key} only goes with SCMP_ACT_ERRNO")
    return None
