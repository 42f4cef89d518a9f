"""stratovirt-jailer on the host, with the tiny guest: every VMM process unprivileged, in
the jail's namespaces, root and cgroup; the VM works through it (disk, NIC on a tap owned
by the uid in a network namespace the test made, console, vsock, QMP, hot-plug of a file
placed in the jail); --clean leaves nothing; every user mistake is one line, exit status
2 and nothing created.

This host binds the memory, cpu, pids and io controllers to cgroup v1 (only hugetlb is in
its cgroup v2 hierarchy), so limits are refused here with a line that says so; they are
checked in force inside the nested L1, which mounts a full cgroup v2
(tests/nested/l1/jailer_checks.py).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from jailer import cgroups
from tests.framework.jailer import JAILER, JailedVm
from tests.framework.netns import Netns
from tests.framework.qmp import session

# Top-level host directories no jail may show; less the one this checkout (its sources and
# venv, bound read-only at their own paths) lives under, when it is one of them (a clone
# in /tmp or a home directory).
HOST_ONLY = {"home", "root", "var", "boot", "srv", "tmp"} - {Path(__file__).resolve().parts[1]}

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
UID = GID = 4321
MiB = 1 << 20


def status_of(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, _, value in
            (line.partition(":") for line in text.splitlines())}


@pytest.fixture(scope="module")
def netns():
    with Netns("vmmjl") as ns:
        ns.run("ip", "tuntap", "add", "dev", "tapj0", "mode", "tap", "vnet_hdr",
               "user", str(UID))
        yield ns


@pytest.fixture
def files(tmp_path, tiny_guest):
    """The kernel and two disks, owned by the VM's uid as an operator would make them."""
    kernel = tmp_path / "tiny.elf"
    shutil.copy(tiny_guest, kernel)
    disks = []
    for name in ("root.img", "extra.img"):
        disk = tmp_path / name
        disk.write_bytes(bytes(4 * MiB))
        disks.append(disk)
    for path in (kernel, *disks):
        os.chown(path, UID, GID)
    return [kernel, *disks]


@pytest.fixture
def base(tmp_path):
    base = tmp_path / "jails"
    yield base
    shutil.rmtree(base, ignore_errors=True)


VMM_ARGS = ["-kernel", "/tiny.elf", "-append", "wait", "-drive", "id=d0,file=/root.img",
            "-api-channel", "unix:/run/api.sock", "-chardev", "id=con0,path=/run/console.sock",
            "-device", "vsock,id=vs0,guest-cid=3", "-D", "/vm.log"]


def test_a_jailed_vm_runs_unprivileged_in_its_own_namespaces_and_cleans_up(
        netns, files, base):
    vm = JailedVm(base, "vm-1", files,
                  VMM_ARGS + ["-netdev", "id=n0,netdev=tapj0"],
                  jailer_args=("--new-pid-ns", "--clean", "--netns",
                               f"/run/netns/{netns.name}"))
    vm.spawn()
    try:
        api = vm.wait_for_api()
        cgroup = cgroups.v2_mount() / "stratovirt" / "vm-1"
        host_ns = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("mnt", "pid", "net")}
        processes = vm.descendants()
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in processes}
        assert sorted(names.values()) == sorted(
            ["stratovirt", "vmm-vm", "vmm-blk-d0", "vmm-net-n0",
             "vmm-con-con0", "vmm-vsock-vs0"]), names
        for pid, name in names.items():
            status = status_of(pid)
            assert status["Uid"].split() == [str(UID)] * 4, (name, status["Uid"])
            assert status["Gid"].split() == [str(GID)] * 4, (name, status["Gid"])
            assert status["Groups"] == "", name
            for caps in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
                assert int(status[caps], 16) == 0, (name, caps)
            assert status["NoNewPrivs"] == "1", name
            for kind in ("mnt", "pid"):
                assert os.readlink(f"/proc/{pid}/ns/{kind}") != host_ns[kind], (name, kind)
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == \
                os.stat(f"/run/netns/{netns.name}").st_ino, name
            assert Path(f"/proc/{pid}/environ").read_bytes() == b"", name
            assert "0::/stratovirt/vm-1" in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            seen = set(os.listdir(f"/proc/{pid}/root"))
            assert not seen & HOST_ONLY, (name, seen)
            assert not Path(f"/proc/{pid}/root/etc/passwd").exists(), name
            assert status["Seccomp"] == "2", name
            if name in ("stratovirt", "vmm-vm"):
                # The VMM's own root: the jail, with what it made there and the sources.
                assert {"run", "root.img", "tiny.elf", "dev"} <= seen
                assert {"api.sock", "console.sock", "vs0.vsock"} <= \
                    set(os.listdir(f"/proc/{pid}/root/run"))
                assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == ["kvm", "net", "null",
                                                                         "urandom"]
            elif name.startswith("vmm-vsock-"):
                assert seen == {"run"}, seen      # its sockets' directory, nothing else
            else:
                assert seen == set(), (name, seen)     # a backend's empty root
        pids_in_cgroup = {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
        assert pids_in_cgroup == set(processes)
        assert api == base / "stratovirt" / "vm-1" / "root" / "run" / "api.sock"

        async def steps(qmp, events):
            status = await qmp.execute("query-status")
            await qmp.execute("blockdev-add", {"node-name": "extra", "file": {
                "driver": "file", "filename": "/extra.img"}})
            await qmp.execute("device_add", {"id": "extra", "driver": "virtio-blk-mmio",
                                             "addr": "0x1"})
            block = await qmp.execute("query-block")
            await qmp.execute("quit")
            return status, block

        status, block = session(api, steps)
        assert status["status"] == "running"
        assert {(b["device"], b["inserted"]["file"]) for b in block if b.get("inserted")} == \
            {("d0", "/root.img"), ("extra", "/extra.img")}
        code, _, err = vm.communicate()
        assert code == 0, err
        assert not (base / "stratovirt").exists()          # --clean: the jail is gone
        assert not cgroup.exists()                         # and so is the VM's cgroup
    finally:
        vm.cleanup()


def test_without_clean_the_jail_stays_and_the_api_socket_is_removed(files, base):
    vm = JailedVm(base, "vm-2", files, VMM_ARGS)
    vm.spawn()
    try:
        api = vm.wait_for_api()

        async def quit_(qmp, events):
            await qmp.execute("quit")

        session(api, quit_)
        code, _, err = vm.communicate()
        assert code == 0, err
        # The VMM removed what it made; the jail and its mount points stay for the operator.
        assert {"dev", "root.img", "tiny.elf"} <= set(os.listdir(vm.root))
        assert os.listdir(vm.root / "run") == []
        assert vm.cgroup().exists()
    finally:
        vm.cleanup()


def test_the_vm_dies_with_the_jailer(files, base):
    """No VM runs on unsupervised: a SIGKILLed supervisor takes the jailed VMM along."""
    vm = JailedVm(base, "vm-3", files, VMM_ARGS, jailer_args=("--new-pid-ns",))
    vm.spawn()
    try:
        vm.wait_for_api()
        processes = vm.descendants()
        assert len(processes) == 5         # the launcher, vm, 3 backends
        vm.kill()
        for pid in processes:
            for _ in range(500):
                if not Path(f"/proc/{pid}").exists() or status_of(pid)["State"][0] == "Z":
                    break
                subprocess.run(["sleep", "0.01"])
            assert not Path(f"/proc/{pid}").exists() or status_of(pid)["State"][0] == "Z"
    finally:
        vm.cleanup()


def run_jailer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(JAILER), *args], capture_output=True, text=True, timeout=60)


BAD = {
    "id with a slash": (["--id", "a/b"], "--id 'a/b': 1..64 characters"),
    "id ..": (["--id", ".."], "--id '..': 1..64 characters"),
    "empty id": (["--id", ""], "--id '': 1..64 characters"),
    "id of 65 characters": (["--id", "x" * 65], "1..64 characters"),
    "uid 0": (["--uid", "0"], "would run as root inside the jail"),
    "gid 0": (["--gid", "0"], "would run as root inside the jail"),
    "missing source": (["--source", "/nonexistent/disk.img"],
                       "--source /nonexistent/disk.img: No such file or directory"),
    "relative source": (["--source", "disk.img"], "--source disk.img: must be an absolute path"),
    "unknown cgroup file": (["--cgroup", "memory.bogus=1"],
                            "--cgroup memory.bogus: unknown cgroup file; allowed:"),
    "cgroup without value": (["--cgroup", "pids.max"], "expected FILE=VALUE"),
    "netns that is a file": (["--netns", "/etc/hostname"],
                             "--netns /etc/hostname: not a network namespace"),
    "missing netns": (["--netns", "/run/netns/nonexistent"],
                      "--netns /run/netns/nonexistent: No such file or directory"),
    "bad resource limit": (["--resource-limit", "cpu=1"], "expected no-file=N or fsize=N"),
    "relative base": (["--chroot-base-dir", "jails"], "must be an absolute path"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_mistake_is_one_line_status_2_and_nothing_created(case, files, base):
    change, expected = BAD[case]
    args = {"--id": "bad", "--uid": str(UID), "--gid": str(GID),
            "--chroot-base-dir": str(base)}
    extra = []
    for key, value in zip(change[::2], change[1::2]):
        if key in args:
            args[key] = value
        else:
            extra += [key, value]
    argv = [x for pair in args.items() for x in pair] + extra + \
        ["--source", str(files[0]), "--", "-kernel", "/tiny.elf", "-api-channel", "unix:/a.sock"]
    result = run_jailer(*argv)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not base.exists()
    assert not (cgroups.v2_mount() / "stratovirt" / "bad").exists()


def test_a_source_the_uid_cannot_read_is_refused(files, base, tmp_path):
    secret = tmp_path / "secret.img"
    secret.write_bytes(bytes(4096))
    os.chmod(secret, 0o600)                         # root's, unreadable by 4321
    result = run_jailer("--id", "s", "--uid", str(UID), "--gid", str(GID),
                        "--chroot-base-dir", str(base), "--source", str(secret), "--",
                        "-kernel", "/tiny.elf", "-api-channel", "unix:/a.sock")
    assert result.returncode == 2 and "not readable by uid 4321" in result.stderr
    assert not base.exists()


def test_an_existing_jail_is_refused_and_kept(files, base):
    jail = base / "stratovirt" / "taken" / "root"
    jail.mkdir(parents=True)
    (jail / "mine").write_text("an earlier VM's")
    result = run_jailer("--id", "taken", "--uid", str(UID), "--gid", str(GID),
                        "--chroot-base-dir", str(base), "--", "-kernel", "/tiny.elf",
                        "-api-channel", "unix:/a.sock")
    assert result.returncode == 2 and "already exists" in result.stderr, result.stderr
    assert (jail / "mine").read_text() == "an earlier VM's"


def test_a_limit_whose_controller_is_not_in_cgroup_v2_is_refused(files, base):
    """Here memory is bound to cgroup v1: a memory.max that would not be enforced is an
    error, not a silent no-op."""
    available = (cgroups.v2_mount() / "cgroup.controllers").read_text().split()
    if "memory" in available:
        pytest.skip("this host has the memory controller in cgroup v2 (checked in L1 too)")
    result = run_jailer("--id", "m", "--uid", str(UID), "--gid", str(GID),
                        "--chroot-base-dir", str(base), "--cgroup", "memory.max=64M", "--",
                        "-kernel", "/tiny.elf", "-api-channel", "unix:/a.sock")
    assert result.returncode == 2
    assert "the memory controller is not available in the cgroup v2 hierarchy" in result.stderr
    assert not base.exists()


def test_no_cgroup_v2_is_one_line(files, base):
    """In a mount namespace of the test's own, without the cgroup2 mount."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if " - cgroup2 " in line]
    script = "; ".join(f"umount {m}" for m in mounts) + \
        f"; exec {JAILER} --id c --uid {UID} --gid {GID} --chroot-base-dir {base} -- " \
        "-kernel /tiny.elf -api-channel unix:/a.sock"
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cgroup v2 is not mounted" in result.stderr and result.stderr.count("\n") == 1
    assert not base.exists()


def test_the_vmm_configuration_error_inside_the_jail_is_its_own_line(files, base):
    """Paths are the jail's: a kernel not placed there is the VMM's one-line error, and
    the jail made for it is removed again."""
    result = run_jailer("--id", "k", "--uid", str(UID), "--gid", str(GID),
                        "--chroot-base-dir", str(base), "--", "-kernel", "/missing.elf",
                        "-api-channel", "unix:/a.sock")
    assert result.returncode == 2, result
    assert result.stderr.startswith("stratovirt: error: -kernel") and \
        result.stderr.count("\n") == 1, result.stderr
    assert not (base / "stratovirt").exists()
    assert not (cgroups.v2_mount() / "stratovirt" / "k").exists()
