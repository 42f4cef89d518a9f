"""A device backend's empty root (vmm/sandbox/empty_root.py), entered by sandbox.confine
for every backend role: seen from the host (nothing under /proc/PID/root, a read-only
tmpfs, namespaces of its own, no capabilities) and from inside (no path resolves,
nothing can be made); as root, as an unprivileged uid with no capabilities (the jailer's
launcher), and with -disable-seccomp, which skips only the filter; vsock's root holds its
socket directory and connects there; a backend forked under the launcher's filter (hot-
plug, restarts) gets the same and still does disk I/O; no user namespace to be had is one
line naming the reason, never a backend running unjailed."""

import ctypes
import errno
import logging
import os
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import prctl
import pytest

from tests.framework import disk_backend
from tests.framework.confined import run_child
from tests.framework.jail import check_jailed
from tests.framework.virtio_driver import DATA_GPA, Driver
from vmm import sandbox
from vmm.devices.virtio.block import request as R
from vmm.devices.virtio.block.device import VIRTIO_F_VERSION_1
from vmm.sandbox import empty_root

pytestmark = pytest.mark.needs_root      # confine() of a backend drops capabilities
NOBODY = 65534
PTRACE_SEIZE = 0x4206
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


@pytest.fixture
def public_dir():
    """A directory under /tmp anyone may enter (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="er", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def jailed_child(body, *, ready_timeout: float = 20):
    """Fork a child that runs body() (which confines it) and then waits; returns (pid,
    the line body() reported, release). release() lets it exit and returns its status."""
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)
            line = body() or "ok"
            os.write(to_parent_w, line.encode() + b"\n")
            os.read(to_child_r, 1)
            code = 0
        except BaseException as error:     # noqa: BLE001 - reported through the pipe
            os.write(to_parent_w, f"raised {error!r}\n".encode())
        finally:
            os._exit(code)
    os.close(to_parent_w)
    os.close(to_child_r)
    line = os.read(to_parent_r, 4096).decode().strip()
    os.close(to_parent_r)

    def release() -> int:
        os.write(to_child_w, b"x")
        os.close(to_child_w)
        return os.waitpid(pid, 0)[1]
    return pid, line, release


def look_around() -> str:
    """What a backend without a filter finds from inside its root."""
    found = {"root": os.listdir("/"), "cwd": os.getcwd(), "uid": os.getuid(),
             "gid": os.getgid()}
    for path in ("/etc/passwd", "/proc/self/status", "/dev/null"):
        try:
            os.open(path, os.O_RDONLY)
            found[path] = "opened"
        except OSError as error:
            found[path] = errno.errorcode[error.errno]
    try:
        os.mkdir("/x")
    except OSError as error:
        found["mkdir"] = errno.errorcode[error.errno]
    return repr(found)


def test_a_backend_without_its_filter_still_finds_nothing():
    """-disable-seccomp (seccomp=False) skips the filter, not the empty root."""
    pid, line, release = jailed_child(lambda: (sandbox.confine("virtio-blk", seccomp=False),
                                               look_around())[1])
    try:
        assert eval(line) == {"root": [], "cwd": "/", "uid": 0, "gid": 0,
                              "/etc/passwd": "ENOENT", "/proc/self/status": "ENOENT",
                              "/dev/null": "ENOENT", "mkdir": "EROFS"}
        check_jailed(pid, os.getpid(), filters=0)
    finally:
        assert release() == 0


@pytest.mark.parametrize("role", sandbox.BACKENDS)
def test_every_backend_role_gets_an_empty_root_before_its_filter(role):
    pid, line, release = jailed_child(lambda: sandbox.confine(role))
    try:
        assert line == "ok"
        check_jailed(pid, os.getpid())
    finally:
        assert release() == 0


def test_the_other_roles_get_none():
    def body():
        sandbox.confine("vm", seccomp=False)
        return repr(os.listdir("/"))

    pid, line, release = jailed_child(body)
    try:
        assert eval(line) == os.listdir("/")
        assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    finally:
        assert release() == 0


def test_vsocks_root_holds_its_socket_directory_and_connects_there(public_dir):
    host = socket.socket(socket.AF_UNIX)
    host.bind(f"{public_dir}/v.vsock_5000")
    host.listen(1)

    def body():
        sandbox.confine("virtio-vsock", seccomp=False, reach=public_dir)
        stream = socket.socket(socket.AF_UNIX)
        stream.connect(f"{public_dir}/v.vsock_5000")
        stream.sendall(b"from the jail")
        return repr(sorted(os.listdir("/")))

    pid, line, release = jailed_child(body)
    try:
        assert eval(line) == ["tmp"]
        conn, _ = host.accept()
        assert conn.recv(100) == b"from the jail"
        conn.close()
        check_jailed(pid, os.getpid(), reach=public_dir, filters=0)
    finally:
        host.close()
        assert release() == 0


@pytest.mark.parametrize("reach", [None, "public"])
def test_an_unprivileged_launcher_gets_the_same(public_dir, reach):
    """The jailer runs the launcher as an unprivileged uid with no capabilities: the
    user namespace is what lets its backends make the rest, and drop_capabilities() still
    empties every set (in the new namespace)."""
    where = public_dir if reach else None

    def body():
        sandbox.prepare()                     # the launcher compiles every filter first
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # every capability goes with uid 0
        # As after an exec as that uid (the jailer execs the VMM): a process whose ids
        # changed is not dumpable, and its /proc/self files are then root's.
        prctl.set_dumpable(True)
        assert int(Path("/proc/self/status").read_text().split("CapEff:\t")[1][:16], 16) == 0
        empty_root._ids.cache_clear()         # a launcher started as this uid
        sandbox.confine("virtio-vsock" if where else "virtio-blk", reach=where)

    pid, line, release = jailed_child(body)
    try:
        assert line == "ok"
        check_jailed(pid, os.getpid(), reach=where, ids=(NOBODY, NOBODY))
    finally:
        assert release() == 0


def test_a_backend_cannot_trace_its_launcher_although_it_runs_as_its_uid():
    """Under the jailer every process of the VMM is one unprivileged uid. Without its own
    user namespace a backend without its filter (-disable-seccomp) could ptrace the
    launcher; in a namespace of its own the kernel wants CAP_SYS_PTRACE over the
    launcher's namespace, which it cannot have."""
    def body(log_fd):
        sandbox.prepare()
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        prctl.set_dumpable(True)
        empty_root._ids.cache_clear()
        backend = os.fork()
        if backend == 0:
            code = 1
            try:
                sandbox.confine("virtio-blk", seccomp=False)
                # PTRACE_SEIZE: the permission check of an attach, without stopping it.
                result = _libc.ptrace(PTRACE_SEIZE, os.getppid(), None, None)
                os.write(log_fd, (errno.errorcode[ctypes.get_errno()] if result else
                                  "attached").encode())
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(backend, 0)[1] == 0

    ending = run_child(body)
    assert ending.exit_code == 0, ending
    assert ending.log == "EPERM"


def test_no_user_namespace_to_be_had_is_one_line_and_no_backend():
    """user.max_user_namespaces=0 (set in a user namespace of the test's own, whose
    limits are its own: the host's stays as it is)."""
    def body(log_fd):
        uid, gid = os.geteuid(), os.getegid()
        assert _libc.unshare(empty_root.lib.CLONE_NEWUSER) == 0
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            Path(f"/proc/self/{name}").write_text(text)
        Path("/proc/sys/user/max_user_namespaces").write_text("0")
        empty_root._ids.cache_clear()
        before = os.listdir("/")
        try:
            sandbox.confine("virtio-net")
        except sandbox.EmptyRootError as error:
            os.write(log_fd, f"{error}\n".encode())
            assert os.listdir("/") == before                   # nothing half done
            assert "\nSeccomp:\t0\n" in Path("/proc/self/status").read_text()

    ending = run_child(body)
    assert ending.exit_code == 0, ending
    assert ending.log == (
        "cannot enter an empty root: unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWIPC): No "
        "space left on device (user.max_user_namespaces, max_mnt_namespaces or "
        "max_ipc_namespaces is 0 or used up)\n")


@pytest.mark.parametrize("reach", ["relative/dir", "/a/../b", "/a/"])
def test_a_root_holding_anything_but_one_normalized_directory_is_refused(reach):
    # Refused before anything changes, so the test process can ask.
    with pytest.raises(empty_root.EmptyRootError, match="absolute, normalized directory"):
        empty_root.enter(reach)


def test_a_socket_directory_of_slash_keeps_the_root_and_says_so():
    """The jailer's layout (the VMM's sockets at the top of its jail): vsock's socket
    directory is / and nothing can be hidden from it; it still gets its namespaces."""
    host_user = os.readlink("/proc/self/ns/user")

    def body(log_fd):
        handler = logging.StreamHandler(os.fdopen(os.dup(log_fd), "w"))
        logging.getLogger(empty_root.__name__).addHandler(handler)
        before = sorted(os.listdir("/"))
        sandbox.confine("virtio-vsock", seccomp=False, reach="/")
        handler.flush()
        assert sorted(os.listdir("/")) == before
        assert os.readlink("/proc/self/ns/user") != host_user

    ending = run_child(body)
    assert ending.exit_code == 0, ending
    assert ending.log == ("its sockets' directory is /, so its root stays / (an api-channel "
                          "in a directory of its own would give it an empty root)\n")


def test_a_disk_backend_forked_under_the_launchers_filter_is_jailed_and_serves(tmp_path):
    """Hot-plug and restarts fork backends from the confined launcher: they make their
    empty root under its filter, then stack their own, and the disk works."""
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    child, connection = disk_backend.spawn(image, under_launcher=True)
    driver = Driver(connection, mem_size=16 << 20, num=16)
    try:
        driver.start(VIRTIO_F_VERSION_1)
        check_jailed(child.pid, os.getpid(), filters=2)       # its own on the launcher's
        data = os.urandom(4096)
        for kind, payload, read in ((R.T_OUT, data, 0), (R.T_IN, b"", 4096)):
            driver.memory.write(DATA_GPA, struct.pack("<IIQ", kind, 0, 8))
            chain = [(DATA_GPA, 16, False)]
            if payload:
                driver.memory.write(DATA_GPA + 0x1000, payload)
                chain.append((DATA_GPA + 0x1000, len(payload), False))
            if read:
                chain.append((DATA_GPA + 0x2000, read, True))
            chain.append((DATA_GPA + 0x20, 1, True))
            driver.submit(chain)
            driver.completion()
            assert driver.memory.read(DATA_GPA + 0x20, 1) == b"\0"
        assert driver.memory.read(DATA_GPA + 0x2000, 4096) == data
        assert image.read_bytes()[8 * 512:8 * 512 + 4096] == data
    finally:
        driver.close()
        connection.close()
        deadline = time.monotonic() + 10
        while not child.reap() and time.monotonic() < deadline:
            time.sleep(0.02)
        child.kill()
    assert os.WIFEXITED(child.status) and os.WEXITSTATUS(child.status) == 0, child.describe_end()
