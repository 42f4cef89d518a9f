"""`stratovirt` through a running zygote (vmm/zygote/__init__.py): hand it this
process's argv, environment, fds and cwd; once its child is the launcher, exec the
stand-in (native/standin.c), which forwards signals and exits with the VM's status.

Imported before anything else of ours (vmm/cli.py): with no zygote it costs one stat.
"""

import os
import sys
import time

from . import DEFAULT_SOCKET, SOCKET_VARIABLE

STARTED = time.monotonic()       # the timeline's origin (vmm/timeline.py) in the child
STANDIN = os.path.join(os.path.dirname(__file__), "stratovirt-standin")


def run(argv: list[str]) -> int | None:
    """Never returns once the zygote has taken the VM; None when it did not (no zygote,
    or it refused: run the VM here)."""
    path = os.environ.get(SOCKET_VARIABLE, DEFAULT_SOCKET)
    if not path or not os.path.exists(path) or not os.access(STANDIN, os.X_OK):
        return None
    import _signal
    from . import wire
    sock = wire.socket()
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    # Until the stand-in runs, Ctrl-C ends this process (and so the VM: the zygote sees
    # it go), not a KeyboardInterrupt's traceback.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    launcher = _ask(sock, argv)
    if launcher is None:
        sock.close()
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        return None
    os.set_inheritable(sock.fileno(), True)
    environment = dict(os.environb,
                       STRATOVIRT_STANDIN=f"{sock.fileno()}:{launcher}:{_name()}".encode())
    try:
        os.execve(STANDIN, _command_line(), environment)     # ps shows what it showed
    except OSError as error:        # the VM runs without its stand-in: end it
        print(f"stratovirt: error: {STANDIN}: {error.strerror}", file=sys.stderr)
        return 1


def _ask(sock, argv: list[str]) -> int | None:
    """The launcher's pid once the zygote's child has become this process, else None."""
    from . import wire
    fds = _inherited()
    try:
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        wire.send(sock, {"argv": argv, "env": dict(os.environb), "fds": fds,
                         "name": _name(),
                         "started": STARTED}, [cwd, *fds])
        reply = wire.receive(sock)
    except (OSError, wire.WireError):
        return None
    finally:
        os.close(cwd)
    if reply is None or not isinstance(reply[0], dict) or not isinstance(
            reply[0].get("ready"), int):
        return None             # refused (the zygote's log says why) or gone: run it here
    for fd in fds:              # the launcher has its own copies; the stand-in needs none
        if fd > 2:
            os.set_inheritable(fd, False)
    return reply[0]["ready"]


def _name() -> str:
    """This process's name (comm: a console script's, not its interpreter's)."""
    with open("/proc/self/comm") as f:
        return f.read().rstrip("\n")


def _command_line() -> list[bytes]:
    """This process's argv as exec'd (`python -m vmm ...`, not sys.argv's rewrite)."""
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").split(b"\0")


def _inherited() -> list[int]:
    """The fds an exec of the launcher would have kept: those not close-on-exec."""
    kept = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                kept.append(fd)
        except OSError:         # listdir's own fd, closed by now
            pass
    return sorted(kept)
