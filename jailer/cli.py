"""`stratovirt-jailer`: runs the VMM unprivileged in a jail of its own (docs/jailer.md).

    stratovirt-jailer --id ID --uid U --gid G [--chroot-base-dir DIR] [--exec-file PATH]
        [--source PATH]... [--netns PATH] [--cgroup FILE=VALUE]... [--parent-cgroup NAME]
        [--resource-limit no-file=N|fsize=N]... [--new-pid-ns] [--daemonize] [--clean]
        [--allow-root] -- <stratovirt arguments, paths as seen inside the jail>

This process stays outside the jail as the supervisor: it validates, creates the jail
directory and the VM's cgroup, forks the child that enters the jail and execs the VMM
(jailer/jail.py), passes SIGTERM and SIGHUP on to it, and exits with its status. With
--clean it then removes the jail directory and the cgroup. A failure before the VMM
starts (a user mistake, or the VMM's own configuration error found inside the jail) is
one line on stderr, exit status 2, and nothing left behind, --clean or not.
"""

import os
import shutil
import signal
import sys
from pathlib import Path

import click

from vmm import daemon

from vmm._sigsys import lib
from vmm.sandbox import namespaces

from . import cgroups, jail
from .spec import SpecError, build

EXIT_USAGE = 2


def default_exec_file() -> str:
    return str(Path(sys.executable).parent / "stratovirt")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--id", "id_", required=True, help="The VM's id: 1..64 of [A-Za-z0-9-].")
@click.option("--uid", type=int, required=True, help="The VMM's user id (not 0).")
@click.option("--gid", type=int, required=True, help="The VMM's group id (not 0).")
@click.option("--chroot-base-dir", default="/srv/jailer", show_default=True,
              help="The jail is DIR/<exec file's name>/ID/root.")
@click.option("--exec-file", default=default_exec_file, show_default="this project's stratovirt",
              help="The VMM to run: a console script of this project.")
@click.option("--source", multiple=True,
              help="A file (kernel, disk, initrd, config) shown at /<its name> in the jail.")
@click.option("--netns", help="A network namespace to join (/var/run/netns/NAME).")
@click.option("--cgroup", "cgroup_settings", multiple=True,
              help="A cgroup v2 limit FILE=VALUE: memory.max, cpu.max, pids.max, io.max, "
                   "cpuset.cpus, ...")
@click.option("--parent-cgroup", default="stratovirt", show_default=True,
              help="The VM's cgroup is <cgroup v2 mount>/NAME/ID.")
@click.option("--resource-limit", multiple=True,
              help="no-file=N (default 2048) or fsize=N (bytes).")
@click.option("--new-pid-ns", is_flag=True, help="The VMM is PID 1 of a PID namespace.")
@click.option("--daemonize", is_flag=True, help="Run in the background once the VMM started.")
@click.option("--clean", is_flag=True, help="Remove the jail and the cgroup when the VM ends.")
@click.option("--allow-root", is_flag=True,
              help="Allow --uid 0 / --gid 0 (root in the jail can undo it: not advised).")
@click.argument("vmm_args", nargs=-1, type=click.UNPROCESSED)
def command(id_, uid, gid, chroot_base_dir, exec_file, source, netns, cgroup_settings,
            parent_cgroup, resource_limit, new_pid_ns, daemonize, clean, allow_root,
            vmm_args):
    spec = build(id=id_, uid=uid, gid=gid, base=chroot_base_dir, exec_file=exec_file,
                 sources=list(source), netns=netns, cgroup_settings=list(cgroup_settings),
                 parent_cgroup=parent_cgroup, resource_limits=list(resource_limit),
                 new_pid_ns=new_pid_ns, daemonize=daemonize, clean=clean,
                 allow_root=allow_root, vmm_args=list(vmm_args))
    return supervise(spec, jail.host_facts())


def main(argv: list[str] | None = None) -> int:
    # Firecracker's first two steps: nothing inherited but stdio, and no environment.
    # Clearing os.environ would leave the operator's variables in this process's memory
    # (and /proc/PID/environ) and in every child forked from it: start afresh without them.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    if not _started_clean():
        args = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "jailer", *args], {})
    if os.geteuid() != 0:
        return _fail("must run as root (it creates namespaces, device nodes and cgroups)")
    try:
        return command.main(args=argv, prog_name="stratovirt-jailer", standalone_mode=False) or 0
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        return _fail(" ".join(error.format_message().split()))
    except click.Abort:
        return EXIT_USAGE
    except (SpecError, jail.JailError) as error:
        return _fail(str(error))


def _started_clean() -> bool:
    """Started with an empty environment: all there may be is the LC_CTYPE that Python
    sets itself when it coerces the C locale to UTF-8 (PEP 538), which the next exec
    would set again."""
    return all(key == "LC_CTYPE" and value in ("C.UTF-8", "C.utf8", "UTF-8")
               for key, value in os.environ.items())


def _fail(line: str) -> int:
    print(f"stratovirt-jailer: error: {line}", file=sys.stderr)
    return EXIT_USAGE


def supervise(spec, host: jail.HostFacts) -> int:
    readiness = daemon.detach() if spec.daemonize else None
    try:
        jail.prepare_directory(spec)
        if spec.cgroup:
            cgroups.create(spec.cgroup)
    except (OSError, cgroups.CgroupError) as error:
        _remove(spec)
        return _failed(readiness, str(error))
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    if spec.new_pid_ns:
        namespaces.unshare(lib.CLONE_NEWPID)     # the next child is its PID 1
    pid = os.fork()
    if pid == 0:
        os.close(report_read)
        try:
            jail.enter(spec, host)
        except BaseException as error:     # anything before exec: one line to the parent
            message = str(error) if isinstance(error, jail.JailError) else \
                f"entering the jail: {error}"
            os.write(report_write, message.encode(errors="replace"))
        os._exit(EXIT_USAGE)
    os.close(report_write)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda n, _: _forward(pid, n))
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal's Ctrl-C reaches the VMM too
    report = _read_all(report_read)
    if report:
        jail.exit_status(pid)
        _remove(spec)
        return _failed(readiness, report.decode(errors="replace"))
    if readiness:
        readiness.ready()
    status = jail.exit_status(pid)
    killed = cgroups.oom_kills(spec.cgroup) if spec.cgroup else 0
    if killed and status:
        # Otherwise the VMM's last words are "killed by signal 9": say why.
        limit = dict(spec.cgroup.limits).get("memory.max", "?")
        print(f"stratovirt-jailer: error: the VM ran out of memory in its cgroup "
              f"(memory.max={limit}): the kernel's OOM killer ended {killed} of its "
              "processes", file=sys.stderr)
    if spec.clean:
        _remove(spec)
    return status


def _failed(readiness, line: str) -> int:
    """One line: the VMM's own configuration error as the VMM words it, else ours."""
    line = " ".join(line.split())
    if not line.startswith("stratovirt: error:"):
        line = f"stratovirt-jailer: error: {line}"
    if readiness:
        readiness.failed(line)
    else:
        print(line, file=sys.stderr)
    return EXIT_USAGE


def _forward(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _remove(spec) -> None:
    """The jail directory and the VM's cgroup, whatever of them exists."""
    if spec.cgroup:
        try:
            cgroups.remove(spec.cgroup)
        except OSError as error:
            print(f"stratovirt-jailer: warning: {spec.cgroup.path}: {error.strerror}",
                  file=sys.stderr)
    shutil.rmtree(spec.jail_dir, ignore_errors=True)
    for parent in (spec.jail_dir.parent,):
        try:
            parent.rmdir()              # DIR/stratovirt, if no other jail is in it
        except OSError:
            pass


def run() -> None:
    sys.exit(main())
