"""The command line of spec.md: accepted forms, and one-line errors for bad input."""

import json
import os
import subprocess
import tempfile

import pytest

from tests.framework.cli import stratovirt, stratovirt_process
from tests.framework.guest import tiny_guest
from vmm.devices.virtio.discovery import cmdline_devices

GiB = 1 << 30
MiB = 1 << 20


def printed(result):
    assert result.code == 0, result
    return json.loads(result.out)


def test_seed_example_with_unquoted_append(files):
    disk = files.disks[0]
    doc = printed(stratovirt(
        "-kernel", str(files.kernel),
        "-append", "console=ttyS0", "root=/dev/vda", "rw", "reboot=k", "panic=1",
        "-drive", f"file={disk},id=rootfs,readonly=false",
        "-api-channel", f"unix:{files.api}", "-serial", "stdio", "-print-config"))
    assert doc["boot-source"]["boot_args"] == "console=ttyS0 root=/dev/vda rw reboot=k panic=1"
    assert doc["drive"] == [{"drive_id": "rootfs", "path_on_host": str(disk),
                             "read_only": False, "direct": True}]
    assert doc["serial"] == {"stdio": True}
    assert not files.api.exists()


def test_quoted_append_is_the_same(files):
    words = "console=ttyS0 root=/dev/vda rw reboot=k panic=1"
    quoted = printed(stratovirt(*files.base(), "-append", words, "-print-config"))
    unquoted = printed(stratovirt(*files.base(), "-append", *words.split(), "-print-config"))
    assert quoted == unquoted


def test_append_words_that_look_like_options_stay_kernel_args(files):
    doc = printed(stratovirt(*files.base(), "-append", "init=/bin/sh", "-v", "quiet",
                             "-print-config"))
    assert doc["boot-source"]["boot_args"] == "init=/bin/sh -v quiet"


def test_defaults(files):
    doc = printed(stratovirt(*files.base(), "-print-config"))
    assert doc["machine-config"] == {"name": "stratovirt", "vcpu_count": 1,
                                     "mem_size": 256 * MiB, "omit_vm_memory": False}
    assert doc["drive"] == [] and doc["net"] == []
    assert "console" not in doc and "vsock" not in doc


@pytest.mark.parametrize("smp,count", [("1", 1), ("4", 4), ("cpus=254", 254), ("cpus=2", 2)])
def test_smp_forms(files, smp, count):
    assert printed(stratovirt(*files.base(), "-smp", smp, "-print-config")
                   )["machine-config"]["vcpu_count"] == count


@pytest.mark.parametrize("smp", ["0", "255", "cpus=0", "-1", "x", "cpus=", "sockets=2", "2,cpus=2"])
def test_smp_refused(files, smp):
    error = stratovirt(*files.base(), "-smp", smp).error
    assert error.startswith("-smp: ")
    assert "1..254" in error


@pytest.mark.parametrize("text,size", [
    ("134217728", 128 * MiB), ("128M", 128 * MiB), ("128MiB", 128 * MiB), ("128m", 128 * MiB),
    ("131072K", 128 * MiB), ("131072KiB", 128 * MiB), ("1G", GiB), ("1gib", GiB),
    ("512G", 512 * GiB), ("5G", 5 * GiB)])
def test_memory_forms(files, text, size):
    assert printed(stratovirt(*files.base(), "-m", text, "-print-config")
                   )["machine-config"]["mem_size"] == size


@pytest.mark.parametrize("text,fragment", [
    ("127M", "allowed 128 MiB..512 GiB"), ("513G", "allowed 128 MiB..512 GiB"),
    ("1T", "K/KiB, M/MiB, G/GiB"), ("1.5G", "K/KiB, M/MiB, G/GiB"), ("abc", "K/KiB"),
    ("", "K/KiB"), (str(128 * MiB + 512), "multiple of 4096 bytes"),
    ("512", "for 512 MiB write 512M")])
def test_memory_refused(files, text, fragment):
    error = stratovirt(*files.base(), "-m", text).error
    assert error.startswith("-m: ") and fragment in error


@pytest.mark.parametrize("option", ["-kernel", "-smp", "-m", "-name", "-api-channel"])
def test_single_options_given_twice(files, option):
    value = {"-kernel": str(files.kernel), "-smp": "1", "-m": "1G", "-name": "a",
             "-api-channel": f"unix:{files.api}"}[option]
    given_twice = [option, value, option, value]
    if option in files.base():
        given_twice = [option, value]
    assert stratovirt(*files.base(), *given_twice).error.startswith(f"{option}: given 2 times")


@pytest.mark.parametrize("argv,where", [
    (["-kernel"], "-kernel: needs a value"),
    (["-kernel", "-smp", "2"], "-kernel: needs a value"),
    (["-append"], "-append: needs a value"),
    (["-append", "-smp", "2"], "-append: needs a value"),
    (["-foo"], "-foo: unknown option"),
    (["-kernal", "x"], "-kernal: unknown option; did you mean -kernel?"),
    (["--kernel", "x"], "--kernel: unknown option; did you mean -kernel?"),
    (["stray"], '"stray": is not an option'),
])
def test_syntax_errors(argv, where):
    assert stratovirt(*argv).error.startswith(where)


def test_kernel_and_api_channel_required(files):
    assert stratovirt("-api-channel", f"unix:{files.api}").error.startswith("-kernel: missing")
    assert stratovirt("-kernel", str(files.kernel)).error.startswith("-api-channel: missing")


@pytest.mark.parametrize("value", ["/tmp/x.sock", "tcp:1.2.3.4:5", "unix:", "UNIX:/x"])
def test_api_channel_must_be_unix(files, value):
    error = stratovirt("-kernel", str(files.kernel), "-api-channel", value).error
    assert error.startswith("-api-channel: ") and "unix:/path/to/socket" in error


def test_existing_api_channel_refused_with_remedy(files):
    files.api.write_text("")
    error = stratovirt(*files.base()).error
    assert f"already exists; remove it first (rm -f \"{files.api}\")" in error


def test_api_channel_in_missing_directory(files):
    error = stratovirt("-kernel", str(files.kernel), "-api-channel",
                       f"unix:{files.dir}/nope/api.sock").error
    assert error.startswith("-api-channel: the directory of") and "does not exist" in error


def test_socket_path_too_long(files):
    deep = files.dir / ("d" * 100)
    deep.mkdir()
    error = stratovirt("-kernel", str(files.kernel), "-api-channel",
                       f"unix:{deep}/api.sock").error
    assert "at most 107 bytes" in error


def test_drives_in_order_and_properties(files):
    d0, d1 = files.disks[:2]
    doc = printed(stratovirt(
        *files.base(), "-drive", f"id=rootfs,file={d0},readonly=true,direct=false,serial=abc",
        "-drive", f"id=data,file={d1},readonly=off,direct=on", "-print-config"))
    assert doc["drive"] == [
        {"drive_id": "rootfs", "path_on_host": str(d0), "read_only": True, "direct": False,
         "serial_num": "abc"},
        {"drive_id": "data", "path_on_host": str(d1), "read_only": False, "direct": True}]


def test_comma_in_a_path_is_doubled(files):
    odd = files.dir / "a,b.img"
    odd.write_bytes(bytes(4096))
    doc = printed(stratovirt(*files.base(), "-drive", f"id=d,file={files.dir}/a,,b.img",
                             "-print-config"))
    assert doc["drive"][0]["path_on_host"] == str(odd)


@pytest.mark.parametrize("spec,fragment", [
    ("id=d", "-drive[0].file: missing; required: id, file"),
    ("file={disk}", "-drive[0].id: missing"),
    ("id=d,file={disk},cache=none", "-drive[0].cache: unknown property; the properties are id, file"),
    ("id=d,file={disk},readonly=maybe", "-drive[0].readonly: \"maybe\" is not a boolean"),
    ("id=d,file={disk},readonly", "-drive[0].readonly: has no value"),
    ("id=d,file={disk},id=e", "-drive[0]: id= given twice"),
    ("id=d,,file={disk}", "-drive[0].file: missing"),
    ("id=d,file={disk},,", "-drive[0].file: disk image"),
    ("id=d,file={disk},", "-drive[0]: empty property"),
    ("id=d,file={disk},serial=" + "x" * 21, "-drive[0].serial: \"" + "x" * 21),
    ("id=d,file={disk},serial=a\tb", "1..20 printable ASCII"),
    ("id=9d,file={disk}", "-drive[0].id: \"9d\" is not a valid id"),
    ("id=d d,file={disk}", "is not a valid id"),
    ("id=" + "d" * 65 + ",file={disk}", "1..64 characters"),
    ("id=d,file=/nonexistent.img", "-drive[0].file: disk image \"/nonexistent.img\": No such file"),
    ("id=d,file=/", "is not a regular file or block device"),
])
def test_drive_refused(files, spec, fragment):
    error = stratovirt(*files.base(), "-drive", spec.format(disk=files.disks[0])).error
    assert fragment in error, error


def test_six_drives_accepted_seventh_refused(files):
    drives = [arg for i, disk in enumerate(files.disks[:7])
              for arg in ("-drive", f"id=d{i},file={disk}")]
    assert len(printed(stratovirt(*files.base(), *drives[:12], "-print-config"))["drive"]) == 6
    error = stratovirt(*files.base(), *drives).error
    assert error.startswith("-drive[6]: 7 disks given; at most 6 (hot-plugged ones included)")


def test_same_image_twice_needs_read_only(files):
    disk = files.disks[0]
    error = stratovirt(*files.base(), "-drive", f"id=a,file={disk}",
                       "-drive", f"id=b,file={disk},readonly=true").error
    assert error.startswith("-drive[1].file: the same file as -drive[0].file")
    printed(stratovirt(*files.base(), "-drive", f"id=a,file={disk},readonly=on",
                       "-drive", f"id=b,file={disk},readonly=on", "-print-config"))


@pytest.mark.needs_root
def test_direct_needs_a_filesystem_with_o_direct(files):
    mount = files.dir / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "none", str(mount)], check=True)
    try:
        disk = mount / "disk.img"
        disk.write_bytes(bytes(4096))
        error = stratovirt(*files.base(), "-drive", f"id=d,file={disk}").error
        assert "cannot be opened with O_DIRECT" in error and "set direct=false" in error
        printed(stratovirt(*files.base(), "-drive", f"id=d,file={disk},direct=false",
                           "-print-config"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.needs_root
def test_permissions_checked_as_the_user_running_it():
    """As root every file is readable; run as nobody to see the real checks."""
    nobody = 65534
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o755)
        kernel, disk = f"{top}/vmlinux.bin", f"{top}/disk.img"
        with open(kernel, "wb") as f:
            f.write(tiny_guest().read_bytes())
        with open(disk, "wb") as f:
            f.write(bytes(4096))
        os.chmod(kernel, 0o600)
        api = f"unix:{top}/api.sock"

        def as_nobody(*argv):
            return stratovirt_process(*argv, cwd="/", user=nobody)

        assert as_nobody("-kernel", kernel, "-api-channel", api).error == \
            f'-kernel: cannot read kernel "{kernel}": Permission denied; make it readable'
        os.chmod(kernel, 0o644)
        os.chmod(disk, 0o644)
        error = as_nobody("-kernel", kernel, "-drive", f"id=d,file={disk}",
                          "-api-channel", api).error
        assert error == (f'-drive[0].file: cannot read and write disk image "{disk}": '
                         "Permission denied; make it writable or set it read-only")
        assert "cannot create api-channel socket in" in as_nobody(
            "-kernel", kernel, "-api-channel", api).error
        os.chmod(top, 0o777)
        ok = as_nobody("-kernel", kernel, "-drive", f"id=d,file={disk},readonly=on",
                       "-api-channel", api, "-print-config")
        assert ok.code == 0, ok


def test_kernel_and_initrd_must_exist(files):
    error = stratovirt("-kernel", "/no/such/vmlinux", "-api-channel", f"unix:{files.api}").error
    assert error == '-kernel: kernel "/no/such/vmlinux": No such file or directory; give an existing regular file'
    error = stratovirt(*files.base(), "-initrd", str(files.dir)).error
    assert error.startswith("-initrd: initrd") and "is not a regular file" in error
    doc = printed(stratovirt(*files.base(), "-initrd", str(files.initrd), "-print-config"))
    assert doc["boot-source"]["initrd_fs_path"] == str(files.initrd)


def test_relative_paths_become_absolute(files, monkeypatch):
    monkeypatch.chdir(files.dir)
    doc = printed(stratovirt("-kernel", "vmlinux.bin", "-api-channel", "unix:api.sock",
                             "-drive", "id=d,file=disk0.img", "-print-config"))
    assert doc["boot-source"]["kernel_image_path"] == str(files.kernel)
    assert doc["drive"][0]["path_on_host"] == str(files.disks[0])


def test_nics(files):
    doc = printed(stratovirt(*files.base(), "-netdev", "id=net0,netdev=tap0,mac=0E:90:DF:9F:A8:88",
                             "-netdev", "id=net1,netdev=tap1", "-print-config"))
    assert doc["net"] == [{"iface_id": "net0", "host_dev_name": "tap0", "mac": "0e:90:df:9f:a8:88"},
                          {"iface_id": "net1", "host_dev_name": "tap1"}]


@pytest.mark.parametrize("spec,fragment", [
    ("id=n,netdev=" + "t" * 16, "1..15 bytes"),
    ("id=n,netdev=", "1..15 bytes"),
    ("id=n,netdev=a/b", "no '/', ':' or whitespace"),
    ("id=n,netdev=a b", "no '/', ':' or whitespace"),
    ("id=n,netdev=a:b", "no '/', ':' or whitespace"),
    ("id=n,netdev=..", "not '.' or '..'"),
    ("id=n,netdev=tap0,mac=01:00:5e:00:00:01", "multicast"),
    ("id=n,netdev=tap0,mac=ff:ff:ff:ff:ff:ff", "multicast"),
    ("id=n,netdev=tap0,mac=00:00:00:00:00:00", "all zeros"),
    ("id=n,netdev=tap0,mac=0e:90:df:9f:a8", "six hex pairs"),
    ("id=n,netdev=tap0,mac=0e-90-df-9f-a8-88", "six hex pairs"),
    ("id=n,netdev=tap0,mac=0g:90:df:9f:a8:88", "six hex pairs"),
    ("id=n", "-netdev[0].netdev: missing"),
])
def test_nic_refused(files, spec, fragment):
    error = stratovirt(*files.base(), "-netdev", spec).error
    assert error.startswith("-netdev[0].") and fragment in error, error


def test_nic_limits(files):
    nics = [a for i in range(3) for a in ("-netdev", f"id=n{i},netdev=tap{i}")]
    assert stratovirt(*files.base(), *nics).error.startswith("-netdev[2]: 3 NICs given; at most 2 (hot-plugged")
    error = stratovirt(*files.base(), "-netdev", "id=a,netdev=tap0", "-netdev", "id=b,netdev=tap0").error
    assert error.startswith('-netdev[1].netdev: tap "tap0" is also used by -netdev[0].netdev')


def test_console_and_vsock(files):
    doc = printed(stratovirt(*files.base(), "-chardev", f"id=console0,path={files.console}",
                             "-device", "vsock,id=vsock0,guest-cid=3", "-print-config"))
    assert doc["console"] == {"console_id": "console0", "socket_path": str(files.console)}
    assert doc["vsock"] == {"vsock_id": "vsock0", "guest_cid": 3}
    doc = printed(stratovirt(*files.base(), "-device", "vsock,id=v,guest-cid=0xFFFFFFFE",
                             "-print-config"))
    assert doc["vsock"]["guest_cid"] == 0xFFFFFFFE


@pytest.mark.parametrize("cid", ["0", "1", "2", "0xFFFFFFFF", "4294967296"])
def test_guest_cid_range(files, cid):
    error = stratovirt(*files.base(), "-device", f"vsock,id=v,guest-cid={cid}").error
    assert error.startswith("-device[0].guest-cid: ") and "allowed 3..4294967294" in error


def test_other_device_limits(files):
    error = stratovirt(*files.base(), "-device", "virtio-rng,id=r").error
    assert error.startswith('-device[0]: unknown device type "virtio-rng"; the only -device type is vsock')
    error = stratovirt(*files.base(), "-device", "vsock,id=a,guest-cid=3",
                       "-device", "vsock,id=b,guest-cid=4").error
    assert error.startswith("-device[1]: 2 vsock devices given; at most 1 (x86_64 allows 2")
    error = stratovirt(*files.base(), "-chardev", f"id=a,path={files.dir}/c1",
                       "-chardev", f"id=b,path={files.dir}/c2").error
    assert error.startswith("-chardev[1]: 2 consoles given; at most 1 (x86_64 allows 2 devices besides disks and NICs")


def test_console_socket_must_not_exist(files):
    files.console.write_text("")
    error = stratovirt(*files.base(), "-chardev", f"id=c,path={files.console}").error
    assert error.startswith("-chardev[0].path: console socket") and "already exists" in error


def test_ids_unique_across_kinds(files):
    error = stratovirt(*files.base(), "-drive", f"id=dev0,file={files.disks[0]}",
                       "-netdev", "id=dev0,netdev=tap0").error
    assert error == '-netdev[0].id: id "dev0" is also used by -drive[0]; ids must be unique across devices'


def test_paths_created_by_the_vmm_must_differ(files):
    error = stratovirt(*files.base(), "-chardev", f"id=c,path={files.api}").error
    assert error.startswith("-chardev[0].path: ") and "is also -api-channel" in error


def test_pidfile_and_daemonize(files):
    pid = files.dir / "vm.pid"
    assert stratovirt(*files.base(), "-pidfile", str(pid)).error == \
        "-pidfile: only works with -daemonize; add -daemonize or drop -pidfile"
    error = stratovirt(*files.base(), "-daemonize", "-serial", "stdio").error
    assert error.startswith("-serial: a daemon has no stdio")
    pid.write_text("1")
    error = stratovirt(*files.base(), "-daemonize", "-pidfile", str(pid)).error
    assert error.startswith("-pidfile: pidfile") and "already exists" in error


@pytest.mark.parametrize("name,ok", [("a", True), ("x" * 255, True), ("", False),
                                     ("x" * 256, False), ("tab\there", False), ("виртуалка", True)])
def test_name(files, name, ok):
    result = stratovirt(*files.base(), "-name", name, "-print-config")
    if ok:
        assert printed(result)["machine-config"]["name"] == name
    else:
        assert result.error.startswith("-name: ")


def test_boot_args_limit(files):
    assert stratovirt(*files.base(), "-append", "x" * 2048).error == \
        "-append: kernel command line of 2048 bytes; at most 2047 bytes"
    # What this kernel takes (2048 bytes with the NUL) less the slots' words we append.
    room = 2048 - 2 - len(cmdline_devices())
    printed(stratovirt(*files.base(), "-append", "x" * room, "-print-config"))
    assert stratovirt(*files.base(), "-append", "x" * (room + 1)).error == (
        "-append: kernel command line too long for this kernel; it takes at most "
        f"{room} bytes besides the virtio-mmio slots' words")


def test_log_file(files):
    assert stratovirt(*files.base(), "-D", str(files.dir)).error.startswith(
        "-D: log file") and "is not a regular file" in stratovirt(*files.base(), "-D", str(files.dir)).error
    error = stratovirt(*files.base(), "-D", f"{files.dir}/no/log").error
    assert error.startswith("-D: the directory of log file")


def test_flags(files):
    doc = printed(stratovirt(*files.base(), "-omit_vm_memory", "-disable-seccomp", "-print-config"))
    assert doc["machine-config"]["omit_vm_memory"] is True


def test_help_documents_every_option_and_range():
    result = stratovirt("--help")
    assert result.code == 0
    for option in ("-config", "-name", "-kernel", "-append", "-initrd", "-smp", "-m", "-drive",
                   "-netdev", "-chardev", "-device", "-api-channel", "-serial", "-D", "-pidfile",
                   "-daemonize", "-disable-seccomp", "-omit_vm_memory", "-print-config"):
        assert f"  {option} " in result.out or f"  {option}\n" in result.out, option
    text = " ".join(result.out.split())
    for fact in ("1..254", "128 MiB..512 GiB", "0..6", "0..2", "3..0xfffffffe", "1..15 bytes",
                 "ELF vmlinux", "bzImage", "powers of 1024", "drive_id, path_on_host"):
        assert fact in text, fact
    assert stratovirt("-h").out == result.out


def test_version():
    result = stratovirt("--version")
    assert result.code == 0 and "0.1.0" in result.out


def test_real_program_errors_are_one_line_and_leave_nothing(tmp_path):
    before = set(os.listdir(tmp_path))
    result = stratovirt_process("-kernel", "k", "-smp", "999", "-api-channel", "unix:api.sock",
                                "-pidfile", "p", "-D", "log", cwd=tmp_path)
    assert result.error.startswith("-smp: 999 vCPUs is out of range")
    assert "Traceback" not in result.err
    assert set(os.listdir(tmp_path)) == before
