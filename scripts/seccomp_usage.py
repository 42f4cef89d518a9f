#!/usr/bin/env python3
"""Records what every role's threads call under their seccomp filters, over real VM
sessions, and lists per role the calls made and the profile entries nothing used
(docs/seccomp.md, "Minimality"). Needs root, /dev/kvm and strace.

    .venv/bin/python scripts/seccomp_usage.py                  host sessions (~20 s)
    .venv/bin/python scripts/seccomp_usage.py --nested         also the nested run (L1+L2,
                                                                many minutes)
    ... --json FILE        write the merged results (for --results of a later run)
    ... --results FILE     merge earlier results instead of recording them again
    ... --markdown         the table docs/seccomp.md carries, instead of the text report

The sessions are in tests/framework/seccomp_usage.py; the trace analysis is
vmm/sandbox/usage.py (`stratovirt seccomp usage`). Exit status 1 when a call was made
that a filter over it does not allow (a violation), or a session failed.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.framework import seccomp_usage as sessions  # noqa: E402
from vmm.sandbox import usage as recorder  # noqa: E402
from vmm.sandbox.profile import load, roles  # noqa: E402


def _reason(comment: str) -> str:
    """Why an entry stays: what its comment says after the marker, else all of it."""
    for marker in (recorder.STAYS, recorder.ONLY_NESTED):
        if marker in comment:
            return comment.split(marker, 1)[1].lstrip(":. ").rstrip(")") or comment
    return comment


def _short(key: str) -> str:
    """`ioctl allow arg1 == KVM_GET_REGS` -> `ioctl(KVM_GET_REGS)`; `openat errno(EACCES) -`
    -> `openat→EACCES`."""
    name, action, conditions = key.split(" ", 2)
    if conditions.startswith("arg1 == ") and name in ("ioctl", "fcntl", "kill", "fallocate"):
        name = f"{name}({conditions[8:]})"
    elif conditions.startswith("arg2 == ") and name == "tgkill":
        name = f"tgkill({conditions[8:]})"
    elif conditions != "-":
        name = f"{name} [{conditions}]"
    return name + (f"→{action[6:-1]}" if action.startswith("errno(") else "")


def markdown(usage: recorder.Usage, profiles) -> str:
    """Per role: the calls seen under its filter over every session, and every entry
    nothing used, with why it stays."""
    unused = usage.unused(profiles)
    out = ["| role | used (calls made under the role's filter; →E: denied with errno E) | "
           "allowed but unused, and why each stays |", "| --- | --- | --- |"]
    for role, profile in profiles.items():
        mine = usage.roles.get(role)
        if mine is None:
            out.append(f"| `{role}` | not recorded: no session drives it yet | - |")
            continue
        denied = {call: profile_errno(profile, call) for call in mine.denied}
        calls = ", ".join(f"`{call}{denied.get(call, '')}`" for call in sorted(mine.calls))
        stays = "<br>".join(f"`{_short(key)}`: {_reason(why)}"
                            for key, why in sorted(unused[role].items()))
        out.append(_row(role, calls, stays))
    return "\n".join(out) + "\n"


def _row(role: str, calls: str, stays: str) -> str:
    """A table row; a | inside a cell (flags) is escaped, as GitHub's tables want."""
    cells = [f"`{role}`", calls, stays or "-"]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def profile_errno(profile, call: str) -> str:
    import errno
    name = call.split("(")[0]
    numbers = {rule.errno for rule in profile.rules if name in rule.names and rule.errno}
    return "".join(f"→{errno.errorcode.get(n, n)}" for n in sorted(numbers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-host", action="store_true", help="skip the host sessions")
    parser.add_argument("--session", action="append", choices=sessions.HOST_SESSIONS,
                        help="only these host sessions (repeatable)")
    parser.add_argument("--nested", action="store_true", help="also the nested run")
    parser.add_argument("--nested-script", action="append", choices=sessions.NESTED_SCRIPTS,
                        help="only these L1 scripts in the nested run (repeatable)")
    parser.add_argument("--results", action="append", default=[],
                        help="merge these earlier results (JSON)")
    parser.add_argument("--json", help="write the merged results here")
    parser.add_argument("--markdown", action="store_true", help="print the docs table")
    parser.add_argument("--keep", type=Path, help="keep the host sessions' traces here "
                        "(a new directory)")
    args = parser.parse_args()

    total = recorder.Usage()
    for path in args.results:
        total.merge(recorder.load_json(path))
    if not args.no_host:
        total.merge(sessions.record_host(args.keep, args.session or sessions.HOST_SESSIONS))
    if args.nested:
        from tests.framework.nested import NestedRig
        with tempfile.TemporaryDirectory() as tmp, NestedRig(echo=True) as rig:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                            tmp, "qemu.qmp"], check=True)
            [wheel] = Path(tmp).glob("qemu_qmp-*.whl")
            nested, _ = sessions.record_nested(rig, wheel,
                                               args.nested_script or sessions.NESTED_SCRIPTS)
        total.merge(nested)
    if args.json:
        Path(args.json).write_text(json.dumps(total.to_json(), indent=1, sort_keys=True) + "\n")
    profiles = {role: load(role) for role in roles()}
    print(markdown(total, profiles) if args.markdown else recorder.report(total, profiles))
    failed = [run for run in total.runs if run.get("status")]
    for run in failed:
        print(f"session {run.get('session')} ended with status {run['status']}: "
              f"{run.get('stderr', '')[-500:]}", file=sys.stderr)
    return 1 if total.violations or failed else 0


if __name__ == "__main__":
    sys.exit(main())
