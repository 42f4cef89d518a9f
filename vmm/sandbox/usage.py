"""What each role's threads actually call, recorded with strace, against what its profile
allows: `stratovirt seccomp usage` (docs/seccomp.md, "Minimality").

A run is traced with `strace -f -qq -Y -X verbose` (every thread and child; each line
names its thread, `-Y` adds the thread's name, `-X verbose` prints every constant as its
number and its name). From the trace, for every thread:

- which filters it runs under at each of its syscalls: a successful
  seccomp(SECCOMP_SET_MODE_FILTER) pushes the role named by the thread's name at that
  moment (`vmm.sandbox.audit.role_of`, the mapping `stratovirt seccomp check` uses; a
  filtered thread with any other name is the launcher); a new thread or process starts
  with the filters its creator had when it called clone. Without TSYNC (which the VMM
  never uses) a filter covers only the thread that loaded it and what that thread
  creates afterwards.
- for each syscall and each filter over it, the profile entries that match it: name,
  and the argument conditions evaluated on the numbers strace printed (what the kernel
  hands the filter). No matching entry means the filter traps it: a violation.

Syscalls made before a thread has any filter (start-up, imports) are not counted: no
profile covers them. The result per role: the calls (with ioctl requests, fcntl
commands, prctl options and signals by name), the entries used, the entries nothing
used (with their comments), calls denied by an errno entry (with their arguments), and
the threads seen under the role.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from . import constants
from .profile import Profile, ProfileError, Rule, load

STRACE = ("strace", "-f", "-qq", "-Y", "-X", "verbose", "-s", "16")
FORMAT = 1                              # of the JSON document
# How a profile entry's comment (seccomp_profiles/generate.py writes them) says why it
# stays although the host recording (scripts/seccomp_usage.py) may not use it: a path
# only a Linux guest takes (the nested recording shows it), or a reason of its own.
ONLY_NESTED = "Recorded only with a Linux guest (the nested run)"
STAYS = "Stays although a recorded run may not call it"

SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC = 1, 1
PR_SET_NAME, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 15, 22, 2
CLONE_THREAD = 0x10000
# The argument a profile conditions on, shown by name next to the syscall.
_DETAIL = {"ioctl": 1, "fcntl": 1, "prctl": 0, "seccomp": 0, "kill": 1, "tgkill": 2,
           "socket": 0, "socketpair": 0, "fallocate": 1, "memfd_create": 1, "unshare": 0,
           "mount": 3, "umount2": 1}
_CREATES = ("clone", "clone3", "fork", "vfork")
_SAMPLES = 5                             # arguments kept per call denied by an errno entry

_LINE = re.compile(r"^(\d+)(?:<(.*?)>)? (.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([\w?]+) resumed>(.*)$")
_UNFINISHED = " <unfinished ...>"
_CALL = re.compile(r"^([\w?]+)\((.*)$", re.S)
_COMMENT = re.compile(r"/\*.*?\*/", re.S)


class UsageError(Exception):
    """A trace that cannot be read, or a run that could not be traced."""


@dataclass
class Call:
    tid: int
    comm: str | None           # the thread's name when strace printed the call (-Y)
    name: str
    args: list[str]            # as strace printed them, comments included
    result: str                # what follows "= ", or "?" for a call that never returned

    def arg(self, index: int) -> int | None:
        """Argument `index` as the number the kernel saw, None if strace did not print it
        as one. clone's arguments are named (`flags=...`)."""
        if self.name == "clone":
            token = next((a for a in self.args if a.startswith("flags=")), None)
            return number(token) if index == 0 and token else None
        return number(self.args[index]) if index < len(self.args) else None

    def returned(self) -> int | None:
        found = re.match(r"-?(0x[0-9a-fA-F]+|\d+)", self.result)
        return number(found.group(0)) if found else None

    def text(self) -> str:
        return f"{self.name}({', '.join(self.args)}) = {self.result}"


@dataclass
class Thread:
    tid: int
    events: list = field(default_factory=list)     # Call, or ("signal", name, text)
    parent: tuple[int, int] | None = None            # (creator tid, index of its clone)
    thread_of: int | None = None                     # the creator, for CLONE_THREAD
    names: list[str] = field(default_factory=list)   # comm values seen, in order


def number(token: str | None) -> int | None:
    """The value of one argument as strace -X verbose prints it: `0xae80 /* KVM_RUN */`,
    `-1`, `NULL`, `flags=0x3d0f00 /* ... */|17 /* SIGCHLD */`, a mode `0755`; None for
    anything else (strings, structures, arrays)."""
    if token is None:
        return None
    token = _COMMENT.sub("", token).strip()
    if "=" in token and not token.startswith(("{", "[", '"')):
        token = token.split("=", 1)[1].strip()
    if token == "NULL":
        return 0
    total = 0
    for part in token.split("|"):
        part = part.strip()
        try:
            # A mode (mkdir's) is printed in C's octal: 0755.
            octal = len(part) > 1 and part[0] == "0" and part[1:].isdigit()
            total |= int(part, 8 if octal else 0) & (1 << 64) - 1
        except ValueError:
            return None
    return total


def _symbol(token: str) -> str | None:
    """The name strace put in the comment of a token, if one."""
    found = _COMMENT.search(token or "")
    return found.group(0)[2:-2].strip() if found else None


def split_args(text: str) -> tuple[list[str], str]:
    """Split `a, b, {c, d}) = 0 ...` at the top-level commas up to the closing parenthesis
    of the call; returns (arguments, what follows the parenthesis). A call cut short
    (never resumed) has no parenthesis: everything is arguments."""
    args, depth, start, i, quote = [], 0, 0, 0, False
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end < 0 else end + 1
        elif c in "([{":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == ")":
            if depth == 0:
                args.append(text[start:i])
                return [a.strip() for a in args if a.strip()], text[i + 1:]
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:i])
            start = i + 1
        i += 1
    args.append(text[start:])
    return [a.strip() for a in args if a.strip()], ""


def _call(tid: int, comm: str | None, text: str) -> Call | None:
    # `ioctl(5, 0xae80 /* KVM_RUN */ <unfinished ...>) = ?`: the thread ended in the call.
    match = _CALL.match(text.replace(_UNFINISHED, ""))
    if not match:
        return None
    args, rest = split_args(match.group(2))
    rest = rest.strip()
    result = rest[1:].strip() if rest.startswith("=") else "?"
    return Call(tid, comm, match.group(1), args, result)


def parse(lines) -> tuple[dict[int, Thread], int | None]:
    """strace -f output -> every thread's calls (joined where strace split them) and
    signals, in its own order, with who created it; and the first thread (the traced
    command)."""
    threads: dict[int, Thread] = {}
    pending: dict[int, tuple[str | None, str]] = {}
    first = None

    def thread(tid: int) -> Thread:
        if tid not in threads:
            threads[tid] = Thread(tid)
        return threads[tid]

    def add(call: Call) -> None:
        me = thread(call.tid)
        me.events.append(call)
        if call.name in _CREATES:
            child = call.returned()
            if child and child < 1 << 31:
                flags = _clone_flags(call)
                threads.setdefault(child, Thread(child)).parent = (call.tid, len(me.events) - 1)
                if flags is not None and flags & CLONE_THREAD:
                    threads[child].thread_of = call.tid

    for raw in lines:
        match = _LINE.match(raw.rstrip("\n"))
        if not match:
            continue
        tid, comm, body = int(match.group(1)), match.group(2), match.group(3)
        first = tid if first is None else first
        me = thread(tid)
        if comm and (not me.names or me.names[-1] != comm):
            me.names.append(comm)
        resumed = _RESUMED.match(body)
        if resumed:
            if tid in pending:
                start_comm, start = pending.pop(tid)
                call = _call(tid, start_comm, start + resumed.group(2))
                if call:
                    add(call)
            continue
        if body.endswith(_UNFINISHED):
            pending[tid] = (comm, body[:-len(_UNFINISHED)])
            continue
        if body.startswith("---"):
            signal = body.split()[1] if len(body.split()) > 1 else "?"
            me.events.append(("signal", signal, body))
            continue
        if body.startswith("+++"):
            if tid in pending:                  # died inside a call: it was still made
                start_comm, start = pending.pop(tid)
                call = _call(tid, start_comm, start)
                if call:
                    add(call)
            me.events.append(("exit", body.strip("+ "), body))
            continue
        call = _call(tid, comm, body)
        if call:
            add(call)
    for tid, (start_comm, start) in pending.items():
        call = _call(tid, start_comm, start)
        if call:
            add(call)
    return threads, first


def _clone_flags(call: Call) -> int | None:
    if call.name == "clone3":
        found = re.search(r"flags=([^,}]*)", call.args[0] if call.args else "")
        return number(found.group(1)) if found else None
    if call.name == "clone":
        return call.arg(0)
    return 0                                    # fork, vfork: a new process


def installed_filter(call: Call) -> bool:
    """A call that loaded a seccomp filter for its thread."""
    if call.returned() != 0:
        return False
    if call.name == "seccomp" and call.arg(0) == SECCOMP_SET_MODE_FILTER:
        if (call.arg(1) or 0) & SECCOMP_FILTER_FLAG_TSYNC:
            raise UsageError(f"thread {call.tid} loaded a filter with TSYNC, which this "
                             "recorder does not follow: " + call.text())
        return True
    return call.name == "prctl" and call.arg(0) == PR_SET_SECCOMP and call.arg(1) == SECCOMP_MODE_FILTER


def role_for(comm: str) -> str:
    """The role of a thread that loads a filter, by its name: the VMM's names
    (audit.role_of), and the launcher for any other (`stratovirt`, `python3`)."""
    from .audit import role_of
    return role_of(comm, comm, not comm.startswith("vmm-"))


def filters_over(threads: dict[int, Thread]) -> dict[int, list[tuple[str, ...]]]:
    """For each thread, the roles whose filters were over each of its events."""
    stacks: dict[int, list[tuple[str, ...]]] = {}
    comms: dict[int, list[str | None]] = {}

    def walk(tid: int, seen=()) -> None:
        if tid in stacks:
            return
        me = threads[tid]
        stack, comm = (), None
        if me.parent and me.parent[0] in threads and me.parent[0] not in seen:
            creator, index = me.parent
            walk(creator, seen + (tid,))
            stack = stacks[creator][index]
            comm = comms[creator][index]
        mine, names = [], []
        for event in me.events:
            if isinstance(event, Call):
                comm = event.comm or comm
            mine.append(stack)
            names.append(comm)
            if isinstance(event, Call):
                if event.name == "prctl" and event.arg(0) == PR_SET_NAME and event.returned() == 0:
                    named = re.match(r'"(.*)"', event.args[1] if len(event.args) > 1 else "")
                    comm = named.group(1) if named else comm
                if installed_filter(event):
                    stack = stack + (role_for(comm or "?"),)
        stacks[tid], comms[tid] = mine, names

    for tid in threads:
        walk(tid)
    return stacks


def matches(rule: Rule, call: Call) -> bool | None:
    """Whether the entry allows (or errno-denies) this call; None when strace did not print
    an argument the entry conditions on."""
    if call.name not in rule.names:
        return False
    for condition in rule.args:
        value = call.arg(condition.index)
        if value is None:
            return None
        ops = {"SCMP_CMP_EQ": value == condition.value, "SCMP_CMP_NE": value != condition.value,
               "SCMP_CMP_LT": value < condition.value, "SCMP_CMP_LE": value <= condition.value,
               "SCMP_CMP_GT": value > condition.value, "SCMP_CMP_GE": value >= condition.value,
               "SCMP_CMP_MASKED_EQ": value & condition.value == condition.value_two}
        if not ops[condition.op]:
            return False
    return True


def entry_key(name: str, rule: Rule) -> str:
    """One entry of a profile for one syscall, as `stratovirt seccomp show/diff` write it:
    `ioctl allow arg1 == KVM_RUN`."""
    from .audit import _action, _conditions
    return f"{name} {_action(rule)} {_conditions(name, rule)}"


def entries(profile: Profile) -> dict[str, str]:
    """Every (syscall, entry) of a profile: key -> the entry's comment (the comments of
    all its entries, where several have the same syscall and conditions)."""
    found: dict[str, str] = {}
    for rule in profile.rules:
        for name in rule.names:
            key = entry_key(name, rule)
            found[key] = f"{found[key]} | {rule.comment}" if key in found else rule.comment
    return found


def describe(call: Call) -> str:
    """The call as the report lists it: `ioctl(KVM_RUN)`, `fcntl(F_DUPFD_CLOEXEC)`,
    `tgkill(SIGUSR1)`, `newfstatat(fd)`, `mmap`."""
    index = _DETAIL.get(call.name)
    if index is not None and index < len(call.args):
        token, value = call.args[index], call.arg(index)
        name = constants.names_for(call.name, index, value) if value is not None else None
        name = name or _symbol(token) or (hex(value) if value is not None else token)
        return f"{call.name}({name})"
    if call.name == "newfstatat" and len(call.args) > 3:
        flags = call.arg(3)
        if flags is not None:
            empty = constants.value("AT_EMPTY_PATH")
            return f"newfstatat({'fd' if flags & empty else 'path'})"
    return call.name


@dataclass
class RoleUsage:
    calls: Counter = field(default_factory=Counter)      # describe(call) -> count
    entries: Counter = field(default_factory=Counter)    # entry_key -> count
    denied: dict = field(default_factory=dict)           # describe(call) -> [samples]
    threads: set = field(default_factory=set)


@dataclass
class Usage:
    roles: dict = field(default_factory=dict)            # role -> RoleUsage
    violations: list = field(default_factory=list)       # {role, thread, call}
    undetermined: list = field(default_factory=list)     # calls an entry could not judge
    runs: list = field(default_factory=list)             # what was recorded, with status

    def role(self, role: str) -> RoleUsage:
        return self.roles.setdefault(role, RoleUsage())

    def merge(self, other: "Usage") -> "Usage":
        for role, theirs in other.roles.items():
            mine = self.role(role)
            mine.calls.update(theirs.calls)
            mine.entries.update(theirs.entries)
            mine.threads |= theirs.threads
            for call, samples in theirs.denied.items():
                kept = mine.denied.setdefault(call, [])
                kept += [s for s in samples if s not in kept][:_SAMPLES - len(kept)]
        self.violations += other.violations
        self.undetermined += other.undetermined
        self.runs += other.runs
        return self

    def unused(self, profiles: dict[str, Profile]) -> dict[str, dict[str, str]]:
        """role -> {entry key: comment} for every entry no recorded call used."""
        used = {role: self.roles.get(role, RoleUsage()).entries for role in profiles}
        return {role: {key: why for key, why in entries(profile).items()
                       if not used[role].get(key)}
                for role, profile in profiles.items()}

    def to_json(self) -> dict:
        return {"format": FORMAT, "runs": self.runs,
                "roles": {role: {"calls": dict(sorted(u.calls.items())),
                                 "entries": dict(sorted(u.entries.items())),
                                 "denied": dict(sorted(u.denied.items())),
                                 "threads": sorted(u.threads)}
                          for role, u in sorted(self.roles.items())},
                "violations": self.violations, "undetermined": self.undetermined}

    @classmethod
    def from_json(cls, document: dict) -> "Usage":
        if document.get("format") != FORMAT:
            raise UsageError(f"not a usage document of format {FORMAT}")
        usage = cls(violations=list(document["violations"]),
                    undetermined=list(document["undetermined"]), runs=list(document["runs"]))
        for role, data in document["roles"].items():
            usage.roles[role] = RoleUsage(Counter(data["calls"]), Counter(data["entries"]),
                                          dict(data["denied"]), set(data["threads"]))
        return usage


def analyze(lines, profiles: dict[str, Profile] | None = None, label: str = "trace") -> Usage:
    """A Usage from strace -f output (see the module's comment)."""
    threads, _ = parse(lines)
    stacks = filters_over(threads)
    cache = dict(profiles or {})
    usage = Usage(runs=[{"trace": label}])
    for tid, thread in threads.items():
        for event, stack in zip(thread.events, stacks[tid]):
            if not stack:
                continue
            name = (event.comm if isinstance(event, Call) else None) or \
                (thread.names[-1] if thread.names else "?")
            if not isinstance(event, Call):
                # The kernel's own word on a trap (the reporter's re-raise, SI_TKILL, is
                # not a second violation).
                if event[0] == "signal" and event[1] == "SIGSYS" and "SYS_SECCOMP" in event[2]:
                    usage.violations.append({"role": stack[-1], "thread": name,
                                             "call": event[2]})
                continue
            for role in stack:
                _judge(usage, cache, role, name, event)
    return usage


def _judge(usage: Usage, profiles: dict, role: str, thread: str, call: Call) -> None:
    if role not in profiles:
        try:
            profiles[role] = load(role)
        except ProfileError:
            usage.violations.append({"role": role, "thread": thread,
                                     "call": f"(no profile for role {role}) {call.text()}"})
            profiles[role] = None
    profile = profiles[role]
    if profile is None:
        return
    mine = usage.role(role)
    mine.threads.add(thread)
    found = [(rule, matches(rule, call)) for rule in profile.rules if call.name in rule.names]
    allowed = [rule for rule, ok in found if ok]
    if not allowed:
        if any(ok is None for _, ok in found):
            usage.undetermined.append({"role": role, "thread": thread, "call": call.text()})
        else:
            usage.violations.append({"role": role, "thread": thread, "call": call.text()})
        return
    what = describe(call)
    mine.calls[what] += 1
    for rule in allowed:
        mine.entries[entry_key(call.name, rule)] += 1
    if all(rule.action == "SCMP_ACT_ERRNO" for rule in allowed):
        samples = mine.denied.setdefault(what, [])
        sample = call.text()[:160]
        if len(samples) < _SAMPLES and sample not in samples:
            samples.append(sample)


def record(command: list[str], trace_path: str | None = None, **popen) -> tuple[int, Usage]:
    """Run `command` under strace; (its exit status, the usage). The trace is kept at
    trace_path if given."""
    if not shutil.which(STRACE[0]):
        raise UsageError("strace is not installed (Debian: apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="seccomp-usage-") as tmp:
        path = trace_path or os.path.join(tmp, "trace")
        status = subprocess.run([*STRACE, "-o", path, "--", *command], **popen).returncode
        with open(path, errors="replace") as trace:
            usage = analyze(trace, label=" ".join(command))
    usage.runs[-1] = {"command": " ".join(command), "status": status}
    return status, usage


def load_json(path: str) -> Usage:
    with open(path) as f:
        return Usage.from_json(json.load(f))


def justified(comment: str) -> bool:
    """Whether an entry's comment says why it stays when a recording does not use it."""
    return ONLY_NESTED in comment or STAYS in comment


def report(usage: Usage, profiles: dict[str, Profile]) -> str:
    """The usage as text: per role, the calls made under its filter, the entries nothing
    used with their comments, calls an errno entry denied; then violations."""
    lines = []
    unused = usage.unused(profiles)
    for role, profile in profiles.items():
        if role not in usage.roles:
            lines += [f"role {role}: not recorded (no thread ran under its filter)", ""]
            continue
        mine = usage.roles[role]
        total = len(entries(profile))
        lines.append(f"role {role}: {total - len(unused[role])} of {total} entries used; "
                     f"threads: {', '.join(sorted(mine.threads)) or '(none seen)'}")
        if mine.calls:
            lines.append("  used (calls):")
            lines += [f"    {call:40} {count:>8}" for call, count in sorted(mine.calls.items())]
        for call, samples in sorted(mine.denied.items()):
            lines.append(f"  denied by an errno entry: {call}")
            lines += [f"      {sample}" for sample in samples]
        if unused[role]:
            lines.append("  allowed but unused:")
            for key, why in sorted(unused[role].items()):
                lines.append(f"    {key}{'' if justified(why) else '   (NO REASON TO STAY)'}")
                lines.append(f"        why: {why}")
        lines.append("")
    for kind, found in (("VIOLATION", usage.violations), ("UNDETERMINED", usage.undetermined)):
        for item in found:
            lines.append(f"{kind} role={item['role']} thread={item['thread']}: {item['call']}")
    return "\n".join(lines)
