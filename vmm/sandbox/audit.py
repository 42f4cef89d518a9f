"""`stratovirt seccomp ...`: the profiles as auditors read them, and a running VM's threads
as the kernel sees them.

    list                 the roles and what each is for
    show ROLE            a table: syscall, action, conditions (named), why
    export ROLE --format bpf|pfc [-o FILE]
    diff ROLE1 ROLE2     rules only in one of them (exit status 1 if any, like diff)
    check PID [--deep]   every thread and descendant of PID: role, seccomp mode, filter
                         count; exit status 1 if any is unfiltered. --deep: also each
                         thread's filters read back from the kernel (ptrace) and proven
                         equal to its roles' exported BPF; exit status 1 if any differs
    usage [--trace FILE] [--results JSON] [--json OUT] [-- COMMAND...]
                         what each role's threads called under their filters (strace),
                         and the entries nothing used; exit status 1 on a violation

Errors are one line on stderr (exit status 2), never a traceback.
"""

import errno as errno_names
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import click

from . import constants
from . import seccomp as _seccomp
from . import BACKENDS, backend_role
from .profile import Profile, ProfileError, Rule, load, roles

EXIT_DIFFERENT = EXIT_UNFILTERED = 1
EXIT_ERROR = 2
_MODES = {0: "disabled", 1: "strict", 2: "filter"}
# How many filters each role's threads carry when installed as docs/seccomp.md says: a
# backend hot-plugged or restarted while the VM runs was forked under the launcher's
# filter and stacks its own on it.
EXPECTED_FILTERS = {"launcher": (1,), "vm": (1,), "vcpu": (2,), "api": (2,),
                    **{role: (1, 2) for role in BACKENDS}}
HOT_PLUGGED = "  (hot-plugged or restarted: its own on the launcher's)"
# KVM's own worker threads (kvm-nx-lpage-recovery) sit in the vm process's thread group
# but never run user code: a filter means nothing to them.
KERNEL_WORKER = "kvm-worker"


def main(argv: list[str]) -> int:
    try:
        return seccomp.main(argv, prog_name="stratovirt seccomp", standalone_mode=False) or 0
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        message = " ".join(error.format_message().split())
        print(f"stratovirt seccomp: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except click.Abort:
        return EXIT_ERROR
    except (ProfileError, OSError) as error:
        print(f"stratovirt seccomp: error: {error}", file=sys.stderr)
        return EXIT_ERROR


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def seccomp():
    """Audit the seccomp profiles and the filters of a running VM."""


@seccomp.command("list")
def list_roles():
    """The roles, one a line, with what each profile is for."""
    for role in roles():
        profile = load(role)
        click.echo(f"{role:12} {len(profile.syscalls()):3} syscalls  "
                   f"{profile.comment.split('. ')[0].rstrip('.')}.")


@seccomp.command()
@click.argument("role")
def show(role):
    """ROLE's rules as a table: syscall, action, conditions, why."""
    profile = load(role)
    click.echo(f"role {role}: {profile.comment}")
    click.echo(f"default action: {profile.default_action}; 32-bit (int 0x80) syscalls: "
               "SCMP_ACT_KILL_PROCESS")
    click.echo()
    click.echo(f"{'SYSCALL':18} {'ACTION':14} {'CONDITIONS':44} WHY")
    for rule in sorted(profile.rules, key=lambda r: (r.names[0], r.args != ())):
        why = textwrap.wrap(rule.comment, 60) or [""]
        for index, name in enumerate(rule.names):
            lines = why if index == 0 else [f"(as {rule.names[0]})"]
            click.echo(f"{name:18} {_action(rule):14} {_conditions(name, rule):44} {lines[0]}")
            for more in lines[1:]:
                click.echo(f"{'':78} {more}")


@seccomp.command()
@click.argument("role")
@click.option("--format", "fmt", type=click.Choice(["bpf", "pfc"]), required=True,
              help="bpf: the raw filter program; pfc: libseccomp's pseudo-filter code.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write here instead of standard output.")
def export(role, fmt, output):
    """ROLE's filter, compiled by libseccomp, as BPF or PFC."""
    data = _seccomp.export(_seccomp.build(load(role)), fmt)
    if output:
        Path(output).write_bytes(data)
    elif fmt == "bpf" and sys.stdout.isatty():
        raise click.ClickException("BPF is binary: give -o FILE or redirect standard output")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


@seccomp.command()
@click.argument("role1")
@click.argument("role2")
def diff(role1, role2):
    """Rules of ROLE1 that ROLE2 lacks (-) and the reverse (+)."""
    left, right = _rule_lines(load(role1)), _rule_lines(load(role2))
    differ = False
    for mark, only in (("-", sorted(left.keys() - right.keys())),
                       ("+", sorted(right.keys() - left.keys()))):
        source = left if mark == "-" else right
        for key in only:
            differ = True
            click.echo(f"{mark} {key:70} {source[key]}")
    if load(role1).default_action != load(role2).default_action:
        differ = True
        click.echo(f"default action: {load(role1).default_action} vs {load(role2).default_action}")
    raise click.exceptions.Exit(EXIT_DIFFERENT if differ else 0)


@seccomp.command()
@click.argument("pid", type=int)
@click.option("--deep", is_flag=True,
              help="Also read every thread's filters back from the kernel (ptrace "
                   "PTRACE_SECCOMP_GET_FILTER, each thread stopped for a moment; needs "
                   "root: CAP_SYS_ADMIN) and compare them, instruction for "
                   "instruction, with `export ROLE --format bpf` of the roles the thread "
                   "should carry; exit status 1 if any differs.")
def check(pid, deep):
    """Every thread of PID and of its descendants: role, seccomp mode, filters; with
    --deep, the filters themselves proven equal to the profiles' exported BPF. The
    stand-in of a VM started through the zygote stands for its launcher."""
    launcher = _launcher_of_standin(pid)
    if launcher:
        click.echo(f"{pid} is the stand-in of a VM the zygote forked (vmm/zygote/); "
                   f"checking its launcher, {launcher}")
        pid = launcher
    rows = list(_tasks(pid))
    click.echo(f"{'PID':>8} {'TID':>8} {'NAME':16} {'ROLE':11} {'SECCOMP':8} FILTERS")
    unfiltered = 0
    for process, tid, name, role, mode, filters in rows:
        note = ""
        if role == KERNEL_WORKER:
            note = "  (KVM kernel thread: runs no syscalls)"
        elif mode != 2:
            unfiltered += 1
            note = "  UNFILTERED"
        elif role in EXPECTED_FILTERS and filters not in EXPECTED_FILTERS[role]:
            expected = " or ".join(map(str, EXPECTED_FILTERS[role]))
            note = f"  (expected {expected})"
        elif role.startswith("virtio-") and filters == 2:
            note = HOT_PLUGGED
        click.echo(f"{process:>8} {tid:>8} {name:16} {role:11} {_MODES.get(mode, mode):8} "
                   f"{filters}{note}")
    differing = _deep(rows) if deep else 0
    if unfiltered:
        click.echo(f"{unfiltered} of {len(rows)} threads run without a seccomp filter", err=True)
    if differing:
        click.echo(f"{differing} of {len(rows)} threads carry filters other than their roles' "
                   "exported BPF", err=True)
    if unfiltered or differing:
        raise click.exceptions.Exit(EXIT_UNFILTERED)


def _deep(rows) -> int:
    """check --deep: each thread's verdict (deep_check.judge), one line per thread or per
    difference; the number of threads that differ (a thread gone meanwhile is not)."""
    from . import deep_check, live_filters
    click.echo()
    click.echo("Filters read back from the kernel, compared with `stratovirt seccomp export "
               "ROLE --format bpf`:")
    click.echo(f"{'PID':>8} {'TID':>8} {'NAME':16} {'ROLE':11} RESULT")
    differing = 0
    for process, tid, name, role, _, _ in rows:
        try:
            differs, lines = deep_check.judge(tid, role, kernel_worker=role == KERNEL_WORKER)
        except live_filters.LiveFilterError as error:
            raise click.ClickException(f"--deep: {error.strerror}") from None
        differing += differs
        for line in lines:
            click.echo(f"{process:>8} {tid:>8} {name:16} {role:11} {line}")
    return differing


@seccomp.command(context_settings={"ignore_unknown_options": True})
@click.option("--trace", "traces", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Read this strace -f -Y -X verbose output instead of running a command.")
@click.option("--results", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Add the results of an earlier run (its --json file).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True),
              help="Also write the results as JSON here (- for standard output, no text).")
@click.option("--keep-trace", type=click.Path(dir_okay=False, writable=True),
              help="Keep the strace output of COMMAND here.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def usage(traces, results, json_out, keep_trace, command):
    """Run COMMAND (a VM, or a script that runs VMs) under strace, or read --trace files,
    and show per role the syscalls its threads made under its filter and the entries
    of its profile that nothing used (docs/seccomp.md, "Minimality")."""
    from . import usage as recorder
    if not (traces or results or command):
        raise click.UsageError("give a COMMAND, --trace or --results")
    total = recorder.Usage()
    try:
        for path in results:
            total.merge(recorder.load_json(path))
        for path in traces:
            with open(path, errors="replace") as trace:
                total.merge(recorder.analyze(trace, label=path))
        if command:
            status, recorded = recorder.record(list(command), keep_trace)
            total.merge(recorded)
            if status:
                click.echo(f"stratovirt seccomp usage: {command[0]} exited with status "
                           f"{status}", err=True)
    except recorder.UsageError as error:
        raise click.ClickException(str(error)) from None
    if json_out:
        text = json.dumps(total.to_json(), indent=1, sort_keys=True)
        if json_out == "-":
            click.echo(text)
        else:
            Path(json_out).write_text(text + "\n")
    if json_out != "-":
        click.echo(recorder.report(total, {role: load(role) for role in roles()}))
    raise click.exceptions.Exit(EXIT_DIFFERENT if total.violations else 0)


def role_of(name: str, process_name: str, is_root: bool) -> str:
    """A thread's role from its name (comm) and its process's, as the VMM names them."""
    if name.startswith("kvm-"):
        return KERNEL_WORKER
    for candidate in (name, process_name):
        if re.fullmatch(r"vmm-vcpu\d+", candidate):
            return "vcpu"
        if candidate == "vmm-qmp":
            return "api"
        if candidate == "vmm-vm":
            return "vm"
        if backend_role(candidate):
            return backend_role(candidate)
    return "launcher" if is_root else "?"


def _tasks(root: int):
    """(pid, tid, name, role, seccomp mode, filter count) for every thread of root and
    of its descendants, parents first."""
    if not Path(f"/proc/{root}/task").is_dir():
        raise click.ClickException(f"no process {root}")
    pending = [root]
    while pending:
        pid = pending.pop(0)
        try:
            tids = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
            process_name = _read(f"/proc/{pid}/comm")
        except FileNotFoundError:      # ended while we looked
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                name = _read(f"{base}/comm")
                status = dict(line.split(":", 1) for line in _read(f"{base}/status").splitlines()
                              if ":" in line)
                pending += [int(c) for c in _read(f"{base}/children").split()]
            except FileNotFoundError:
                continue
            yield (pid, tid, name, role_of(name, process_name, pid == root),
                   int(status.get("Seccomp", "0")), int(status.get("Seccomp_filters", "0")))


def _launcher_of_standin(pid: int) -> int | None:
    """The launcher pid a stand-in (native/standin.c) was given, if pid is one."""
    try:
        if not os.readlink(f"/proc/{pid}/exe").endswith("/stratovirt-standin"):
            return None
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environment:
        if entry.startswith(b"STRATOVIRT_STANDIN="):
            return int(entry.split(b"=", 1)[1].split(b":")[1])
    return None


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def _action(rule: Rule) -> str:
    if rule.action == "SCMP_ACT_ERRNO":
        return f"errno({errno_names.errorcode.get(rule.errno, rule.errno)})"
    return rule.action.removeprefix("SCMP_ACT_").lower()


def _conditions(syscall: str, rule: Rule) -> str:
    return " && ".join(_condition(syscall, a) for a in rule.args) or "-"


def _condition(syscall: str, arg) -> str:
    def named(number: int) -> str:
        name = constants.names_for(syscall, arg.index, number)
        return name if name else (hex(number) if number > 9 else str(number))

    ops = {"SCMP_CMP_EQ": "==", "SCMP_CMP_NE": "!=", "SCMP_CMP_LT": "<", "SCMP_CMP_LE": "<=",
           "SCMP_CMP_GT": ">", "SCMP_CMP_GE": ">="}
    if arg.op == "SCMP_CMP_MASKED_EQ":
        mask = named(arg.value)
        mask = f"({mask})" if "|" in mask else mask
        return f"arg{arg.index} & {mask} == {named(arg.value_two) if arg.value_two else 0}"
    return f"arg{arg.index} {ops[arg.op]} {named(arg.value)}"


def _rule_lines(profile: Profile) -> dict[str, str]:
    """One line per (syscall, action, conditions), with its why."""
    lines = {}
    for rule in profile.rules:
        for name in rule.names:
            lines[f"{name:18} {_action(rule):14} {_conditions(name, rule)}"] = rule.comment
    return lines
