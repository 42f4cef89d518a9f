"""What the jailed VMM's Python needs to see, and nothing more: the manifest of host paths
that are bind-mounted read-only into the jail at the same paths.

Why bind mounts of exactly what is needed (and not "import everything, then jail
ourselves"): the VMM then starts as a fresh process by execve, as Firecracker's does,
with no memory of the jailer's privileges, and it may import lazily as it always does.
What it needs is found by asking its own interpreter, not by a list kept by hand: a
probe runs the exec file's interpreter, imports every module of the VMM (a lazy import
must find its shared libraries too), and reports
- the interpreter's prefix (the venv: site-packages, the console scripts, pyvenv.cfg),
  the standard library, and the directory of any top-level package imported from
  elsewhere (an editable install's source tree: only its package directories, never the
  whole checkout);
- the seccomp profiles directory;
- every file mapped into the process (the interpreter binary, libpython if any, and the
  shared libraries its extension modules and ctypes loaded).
To these the jailer adds what finding those libraries takes: /etc/ld.so.cache, the
symbolic links the loader follows (the library names in the cache, /lib -> usr/lib, the
venv's python -> /usr/bin/python3 -> python3.11) recreated as links, and /sbin/ldconfig,
which ctypes.util.find_library runs when pyseccomp loads libseccomp.
"""

import json
import os
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LDCONFIG = "/sbin/ldconfig"
LD_CACHE = "/etc/ld.so.cache"

PROBE = r"""
import importlib, json, os, pkgutil, sys, sysconfig
import vmm
# Every module of the VMM, not only what starting a VM imports: a lazy import (a backend's
# native module, the broker's) would otherwise find its shared library missing in the jail.
for found in pkgutil.walk_packages(vmm.__path__, "vmm."):
    if not found.name.endswith("__main__"):
        importlib.import_module(found.name)
import pyseccomp  # imported by the VMM only to compile a filter it finds in no cache
from vmm.sandbox import profile
maps = set()
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5].strip())
packages = set()
for name, module in list(sys.modules.items()):
    where = getattr(module, "__file__", None)
    if "." not in name and where:
        where = os.path.realpath(where)
        packages.add(os.path.dirname(where) if where.endswith("__init__.py") else where)
paths = sysconfig.get_paths()
print(json.dumps({"prefix": sys.prefix, "stdlib": [paths["stdlib"], paths["platstdlib"]],
                  "profiles": str(profile.PROFILE_DIR), "maps": sorted(maps),
                  "packages": sorted(packages)}))
"""


class PyenvError(Exception):
    pass


@dataclass
class Manifest:
    """Host paths the jail shows read-only: directories and files bind-mounted, and the
    symbolic links on the way to them recreated."""
    directories: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)     # link path -> its target text

    def covers(self, path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in self.directories)

    def add_directory(self, path: str) -> None:
        path = os.path.realpath(path)
        if not self.covers(path):
            self.directories = [d for d in self.directories
                                if not d.startswith(path.rstrip("/") + "/")] + [path]

    def add_file(self, path: str) -> None:
        """`path` as the loader or the kernel will open it: every link on the way is
        recreated, the file at its end is bind-mounted."""
        real = self._follow(path)
        if not self.covers(real) and real not in self.files:
            self.files.append(real)

    def _follow(self, path: str, depth: int = 0) -> str:
        if depth > 40:
            raise PyenvError(f"{path}: too many levels of symbolic links")
        parts = Path(path).parts
        for i in range(2, len(parts) + 1):
            prefix = str(Path(*parts[:i]))
            if os.path.islink(prefix):
                target = os.readlink(prefix)
                self.links[prefix] = target
                resolved = os.path.normpath(os.path.join(os.path.dirname(prefix), target))
                return self._follow(str(Path(resolved, *parts[i:])), depth + 1)
        return path


def manifest(exec_file: Path) -> Manifest:
    """What `exec_file` (a console script of this project) needs to run in the jail."""
    interpreter = _interpreter(exec_file)
    try:
        probe = subprocess.run([interpreter, "-c", PROBE], capture_output=True, text=True,
                               env={}, timeout=60, cwd="/")
    except (OSError, subprocess.SubprocessError) as error:
        raise PyenvError(f"--exec-file {exec_file}: its interpreter {interpreter} did not "
                         f"run: {error}") from None
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise PyenvError(f"--exec-file {exec_file}: its interpreter cannot import this "
                         f"project's VMM ({last})")
    found = json.loads(probe.stdout)
    result = Manifest()
    result.add_directory(found["prefix"])
    for directory in found["stdlib"] + [found["profiles"]] + found["packages"]:
        if os.path.isdir(directory):
            result.add_directory(directory)
        else:
            result.add_file(directory)          # a top-level module that is one file
    result.add_file(str(exec_file))
    result.add_file(interpreter)
    loader = _elf_interpreter(os.path.realpath(interpreter))
    if loader:
        result.add_file(loader)
    libraries = {os.path.realpath(p) for p in found["maps"]}
    for path in sorted(libraries):
        if os.path.isfile(path):
            result.add_file(path)
    for name_path in _cache_entries():
        if os.path.realpath(name_path) in libraries:
            result.add_file(name_path)
    result.add_file(LD_CACHE)
    result.add_file(LDCONFIG)
    return result


def _interpreter(exec_file: Path) -> str:
    """The interpreter named on the script's #! line."""
    try:
        with open(exec_file, "rb") as f:
            first = f.readline(4096)
    except OSError as error:
        raise PyenvError(f"--exec-file {exec_file}: {error.strerror}") from None
    if not first.startswith(b"#!"):
        raise PyenvError(f"--exec-file {exec_file}: not a Python console script (no #! line)")
    words = first[2:].decode(errors="replace").split()
    if not words or not os.path.isabs(words[0]):
        raise PyenvError(f"--exec-file {exec_file}: its #! line names no absolute interpreter")
    return words[0]


def _elf_interpreter(path: str) -> str | None:
    """The program interpreter (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2) of a 64-bit
    ELF executable: the kernel opens it by that path when it runs the interpreter."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:5] != b"\x7fELF\x02":
            return None
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            kind, _, offset, _, _, size = struct.unpack("<IIQQQQ", f.read(40))
            if kind == 3:                                    # PT_INTERP
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def _cache_entries() -> list[str]:
    """The library paths the dynamic loader's cache lists (`ldconfig -p`)."""
    try:
        listing = subprocess.run([LDCONFIG, "-p"], capture_output=True, text=True,
                                 env={"LC_ALL": "C"}, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.rsplit("=> ", 1)[1].strip() for line in listing.splitlines() if "=> " in line]
