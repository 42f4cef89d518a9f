"""A jail as asked for on the command line, validated before anything is created.

Every check that can fail on a user's input runs here, so that a mistake costs one line
and exit status 2 and leaves nothing behind (no jail directory, no cgroup).
"""

import fcntl
import os
import re
import resource
import stat
from dataclasses import dataclass
from pathlib import Path

from . import cgroups, pyenv

ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")
# Firecracker's jailer: no-file defaults to 2048 so that one VM cannot hold the host's fds.
DEFAULT_NOFILE = 2048
RLIMITS = {"no-file": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE}
NS_GET_NSTYPE = 0xB703              # ioctl on a namespace file: its CLONE_NEW* type
CLONE_NEWNET = 0x40000000
UID_MAX = 2**32 - 2                 # (uid_t)-1 means "unchanged" to setresuid


class SpecError(Exception):
    """One line: which option, what is wrong, what is allowed."""


@dataclass(frozen=True)
class JailSpec:
    id: str
    uid: int
    gid: int
    base: Path                                # --chroot-base-dir
    exec_file: Path
    sources: tuple[Path, ...]
    netns: Path | None
    cgroup: cgroups.Cgroup | None
    rlimits: tuple[tuple[int, int], ...]      # (resource, value)
    new_pid_ns: bool
    daemonize: bool
    clean: bool
    vmm_args: tuple[str, ...]
    manifest: pyenv.Manifest

    @property
    def jail_dir(self) -> Path:
        """DIR/<exec file's name>/ID, as Firecracker names it."""
        return self.base / self.exec_file.name / self.id

    @property
    def root(self) -> Path:
        return self.jail_dir / "root"


def build(*, id: str, uid: int, gid: int, base: str, exec_file: str, sources: list[str],
          netns: str | None, cgroup_settings: list[str], parent_cgroup: str,
          resource_limits: list[str], new_pid_ns: bool, daemonize: bool, clean: bool,
          allow_root: bool, vmm_args: list[str]) -> JailSpec:
    if not ID_PATTERN.fullmatch(id):
        raise SpecError(f"--id {id!r}: 1..64 characters, letters, digits and '-' only")
    for name, value in (("--uid", uid), ("--gid", gid)):
        if not 0 <= value <= UID_MAX:
            raise SpecError(f"--{name.lstrip('-')} {value}: allowed 0..{UID_MAX}")
    if (uid == 0 or gid == 0) and not allow_root:
        # Root in the jail keeps every capability on the VM's files and could undo the
        # jail (remount, mknod, ptrace): the point of the jail is a uid that cannot.
        raise SpecError(f"--uid {uid} --gid {gid}: the VMM would run as root inside the "
                        "jail; choose an unprivileged uid and gid (or --allow-root)")
    base_path = Path(base)
    if not base_path.is_absolute():
        raise SpecError(f"--chroot-base-dir {base}: must be an absolute path")
    exec_path = Path(exec_file)
    if not exec_path.is_absolute() or not exec_path.is_file() or not os.access(exec_path, os.X_OK):
        raise SpecError(f"--exec-file {exec_file}: not an absolute path to an executable file")
    checked_sources = _sources(sources, uid, gid)
    netns_path = _netns(netns) if netns else None
    limits = _rlimits(resource_limits)
    try:
        cgroup = cgroups.plan(id, parent_cgroup, cgroup_settings)
    except cgroups.CgroupError as error:
        raise SpecError(str(error)) from None
    except OSError as error:
        raise SpecError(f"cgroup v2: {error}") from None
    spec_without_manifest = dict(id=id, uid=uid, gid=gid, base=base_path, exec_file=exec_path,
                                 sources=checked_sources, netns=netns_path, cgroup=cgroup,
                                 rlimits=limits, new_pid_ns=new_pid_ns, daemonize=daemonize,
                                 clean=clean, vmm_args=tuple(vmm_args))
    jail_dir = base_path / exec_path.name / id
    if os.path.lexists(jail_dir):
        raise SpecError(f"the jail {jail_dir} already exists (another VM's, or one not "
                        "cleaned: remove it, or use another --id)")
    try:
        manifest = pyenv.manifest(exec_path)
    except pyenv.PyenvError as error:
        raise SpecError(str(error)) from None
    return JailSpec(manifest=manifest, **spec_without_manifest)


def _sources(sources: list[str], uid: int, gid: int) -> tuple[Path, ...]:
    """Each --source placed at /<name>: it must exist, be a regular file or a block
    device (a disk), have a name of its own, and be readable by uid:gid, since the
    jail shows it by a bind mount and never changes its owner."""
    names: dict[str, str] = {}
    checked = []
    for source in sources:
        path = Path(source)
        if not path.is_absolute():
            raise SpecError(f"--source {source}: must be an absolute path")
        try:
            info = os.stat(path)
        except OSError as error:
            raise SpecError(f"--source {source}: {error.strerror}") from None
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise SpecError(f"--source {source}: not a regular file or a block device")
        if path.name in names:
            raise SpecError(f"--source {source}: its name {path.name!r} is taken by "
                            f"{names[path.name]} (each source appears as /<name> in the jail)")
        if not _readable(info, uid, gid):
            raise SpecError(f"--source {source}: not readable by uid {uid} gid {gid} (owner "
                            f"{info.st_uid}:{info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o});"
                            " chown or chmod it first")
        names[path.name] = source
        checked.append(path)
    return tuple(checked)


def _readable(info: os.stat_result, uid: int, gid: int) -> bool:
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def _netns(path: str) -> Path:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise SpecError(f"--netns {path}: {error.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise SpecError(f"--netns {path}: not a network namespace (e.g. /var/run/netns/NAME "
                        "from `ip netns add NAME`)")
    return Path(path)


def _rlimits(settings: list[str]) -> tuple[tuple[int, int], ...]:
    limits = {resource.RLIMIT_NOFILE: DEFAULT_NOFILE}
    for setting in settings:
        name, sep, value = setting.partition("=")
        if name not in RLIMITS or not sep:
            raise SpecError(f"--resource-limit {setting!r}: expected no-file=N or fsize=N")
        try:
            number = int(value)
            if number < 0:
                raise ValueError
        except ValueError:
            raise SpecError(f"--resource-limit {setting!r}: N must be a non-negative "
                            "integer") from None
        limits[RLIMITS[name]] = number
    return tuple(limits.items())
