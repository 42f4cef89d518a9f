"""The compiled filters (vmm/sandbox/seccomp.py): each role's program is exactly what
`stratovirt seccomp export ROLE --format bpf` makes of its profile, whether compiled now
or read from the cache; it is installed with one seccomp() call and reads back from the
kernel as exported; the cache is keyed by the profile, the compiler and libseccomp, and
is trusted only when it is the caller's alone."""

import json
import os
import shutil
import signal

import pytest

from vmm.sandbox import live_filters, profile_dir
from vmm.sandbox import seccomp
from vmm.sandbox.profile import load, parse, roles


def exported(role: str) -> bytes:
    return seccomp.export(seccomp.build(load(role)), "bpf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(seccomp.CACHE_VARIABLE, str(directory))
    return directory


def refuse_to_compile(monkeypatch):
    def refuse(*_):
        raise AssertionError("compiled")
    monkeypatch.setattr(seccomp, "build", refuse)


@pytest.mark.parametrize("role", roles())
def test_each_program_is_the_export_compiled_or_cached(cache, monkeypatch, role):
    want = exported(role)
    assert seccomp.program(role) == want
    files = [name for name in os.listdir(cache) if name.startswith(f"{role}-")]
    assert len(files) == 1
    monkeypatch.setattr(seccomp, "build", lambda *_: pytest.fail("compiled although cached"))
    assert seccomp.program(role) == want


def test_without_a_cache_it_compiles_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(seccomp.CACHE_VARIABLE, "")
    monkeypatch.chdir(tmp_path)
    assert seccomp.program("vm") == exported("vm")
    assert os.listdir(tmp_path) == []


def test_a_damaged_file_is_compiled_again_and_replaced(cache):
    seccomp.program("vcpu")
    [name] = os.listdir(cache)
    data = (cache / name).read_bytes()
    (cache / name).write_bytes(data[:8] + bytes([data[8] ^ 1]) + data[9:])
    assert seccomp.program("vcpu") == exported("vcpu")
    assert (cache / name).read_bytes() == data


def test_a_cache_others_may_write_to_is_not_used(cache, monkeypatch):
    seccomp.program("api")
    [name] = os.listdir(cache)
    refuse_to_compile(monkeypatch)
    os.chmod(cache, 0o777)
    with pytest.raises(AssertionError, match="compiled"):
        seccomp.program("api")
    os.chmod(cache, 0o755)
    os.chmod(cache / name, 0o666)
    with pytest.raises(AssertionError, match="compiled"):
        seccomp.program("api")
    os.chmod(cache / name, 0o644)
    seccomp.program("api")


def test_a_link_in_the_cache_is_not_followed(cache, monkeypatch):
    seccomp.program("api")
    [name] = os.listdir(cache)
    (cache / "elsewhere").write_bytes((cache / name).read_bytes())
    (cache / name).unlink()
    (cache / name).symlink_to(cache / "elsewhere")
    refuse_to_compile(monkeypatch)
    with pytest.raises(AssertionError, match="compiled"):
        seccomp.program("api")


def test_an_edited_profile_compiles_afresh_and_replaces_the_old_one(cache, tmp_path,
                                                                   monkeypatch):
    profiles = tmp_path / "profiles"
    shutil.copytree(profile_dir.PROFILE_DIR, profiles)
    monkeypatch.setattr(profile_dir, "PROFILE_DIR", profiles)
    before = seccomp.program("vcpu")
    edited = json.loads((profiles / "vcpu.json").read_text())
    edited["defaultAction"] = "SCMP_ACT_KILL_PROCESS"
    (profiles / "vcpu.json").write_text(json.dumps(edited))
    after = seccomp.program("vcpu")
    assert after != before
    assert after == seccomp.export(seccomp.build(parse("vcpu", edited)), "bpf")
    assert len([n for n in os.listdir(cache) if n.startswith("vcpu-")]) == 1


def test_the_key_names_the_role_and_hashes_what_decides_the_program():
    source = (profile_dir.PROFILE_DIR / "vm.json").read_bytes()
    key = seccomp.cache_key("vm", source)
    assert key.startswith("vm-") and len(key) == len("vm-") + 64
    assert seccomp.cache_key("vm", source + b" ") != key
    assert seccomp.cache_key("vcpu", source) != key


@pytest.mark.needs_root
@pytest.mark.parametrize("role", ["vm", "virtio-blk"])
def test_the_installed_program_reads_back_as_exported(role):
    """One seccomp() call, no flag: the kernel holds the exported program (the check
    --deep comparison), with no SECCOMP_FILTER_FLAG_LOG."""
    program = seccomp.program(role)
    ready_r, ready_w = os.pipe()
    wait_r, wait_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import prctl
            prctl.set_no_new_privs(1)
            seccomp.install_program(program)
            os.write(ready_w, b"r")
            os.read(wait_r, 1)             # read and write: in every role's profile
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        [live] = live_filters.read_filters(pid)
        assert live.program == live_filters.parse_bpf(exported(role))
        assert live.flags == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, wait_r, wait_w):
            os.close(fd)


def test_a_program_that_is_not_bpf_is_refused():
    with pytest.raises(seccomp.FilterError):
        seccomp.install_program(b"\0" * 7)
