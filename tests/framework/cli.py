"""Running `stratovirt` as a user would, in-process (fast) or as a real program."""

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass

from vmm import cli


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The single error line, asserted to be exactly one line in the right form."""
        lines = self.err.splitlines()
        assert self.code == 2, self
        assert len(lines) == 1, self
        assert lines[0].startswith("stratovirt: error: "), self
        return lines[0][len("stratovirt: error: "):]


def stratovirt(*argv: str) -> Result:
    """In-process: the same main() the console script runs."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return Result(code, out.getvalue(), err.getvalue())


def stratovirt_process(*argv: str, cwd=None, user: int | None = None) -> Result:
    """As a separate program, optionally as another uid (to test permissions as root)."""
    def drop():
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)

    proc = subprocess.run([sys.executable, "-m", "vmm", *argv], capture_output=True,
                          text=True, cwd=cwd, preexec_fn=drop if user is not None else None,
                          timeout=60)
    return Result(proc.returncode, proc.stdout, proc.stderr)
