"""StratoVirt 2.x's command line as Kata Containers writes it: read into the same
MachineConfig as the seed's, one-line errors for bad input, mixed lines refused."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.framework.cli import stratovirt, stratovirt_process
from tests.framework.guest import tiny_guest
from tests.framework.netns import Netns
from vmm import config
from vmm.config.form import marker_2x
from vmm.devices.virtio.net import tap

MiB = 1 << 20
GiB = 1 << 30
SANDBOX = "4f6a8b2c" * 8
UUID = "0e90df9f-a888-4f3b-9a2c-1234567890ab"
# getKernelParams for microvm with an ext4 rootfs and Debug on (kata stratovirt.go).
KERNEL_PARAMS = ("root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 "
                 "reboot=k panic=1 net.ifnames=0 ramdom.trust_cpu=on pci=off iommu=off "
                 "acpi=off debug console=hvc0")


def kata_line(files, rng=False, vsock_fd=None, tap_fds=None, tap="tap0_kata",
              shared_fs=False) -> list[str]:
    """The argv stratovirt.go's createParams builds: base parameters, then the devices
    in its order (rng, the Debug console, the rootfs disk; then vsock and the network,
    added by AddDevice)."""
    vm = files.dir
    argv = ["-name", f"sandbox-{SANDBOX}", "-uuid", UUID, "-smp", "1", "-m", "2048",
            "-kernel", str(files.kernel), "-append", KERNEL_PARAMS,
            "-qmp", f"unix:{vm}/qmp.socket,server,nowait", "-D", "-disable-seccomp",
            "-machine", "type=microvm,dump-guest-core=off" + (",mem-share=on" if shared_fs else "")]
    if rng:
        argv += ["-object", "rng-random,id=objrng0,filename=/dev/urandom",
                 "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0"]
    argv += ["-device", "virtio-serial-device,id=virtio-serial0",
             "-chardev", f"socket,id=charconsole0,path={vm}/console.socket,server,nowait",
             "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
             "-drive", f"id=rootfs,file={files.disks[0]},readonly=on,direct=off",
             "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0"]
    if vsock_fd is not None:
        argv += ["-device", f"vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd={vsock_fd}"]
    netdev = f"fds={tap_fds}" if tap_fds else f"ifname={tap}"
    argv += ["-netdev", f"tap,id=eth0,{netdev}",
             "-device", "virtio-net-device,netdev=eth0,id=eth0,mac=02:42:ac:11:00:02"]
    return argv


def printed(result) -> dict:
    assert result.code == 0, result
    return json.loads(result.out)


def test_kata_command_line_prints_the_seed_schema(files):
    """Kata's whole line but vhostfd (this host has no /dev/vhost-vsock to pass; the
    nested suite passes one): every device in the seed's schema."""
    argv = kata_line(files, rng=True) + ["-device", "vhost-vsock-device,id=vsock-id,guest-cid=3"]
    doc = printed(stratovirt(*argv, "-print-config"))
    assert doc == {
        "boot-source": {"kernel_image_path": str(files.kernel), "boot_args": KERNEL_PARAMS},
        "machine-config": {"name": f"sandbox-{SANDBOX}", "vcpu_count": 1, "mem_size": 2 * GiB,
                           "omit_vm_memory": True},
        "serial": {"stdio": False},
        "drive": [{"drive_id": "virtio-blk0", "path_on_host": str(files.disks[0]),
                   "read_only": True, "direct": False}],
        "net": [{"iface_id": "eth0", "host_dev_name": "tap0_kata", "mac": "02:42:ac:11:00:02"}],
        "console": {"console_id": "virtio-console0",
                    "socket_path": str(files.dir / "console.socket")},
        "rng": {"rng_id": "virtio-rng0", "random_file": "/dev/urandom", "max_bytes": 65536,
                "period": 1000},
        "vsock": {"vsock_id": "vsock-id", "guest_cid": 3, "vhost": True},
    }
    assert sorted(os.listdir(files.dir)) == sorted(
        ["vmlinux.bin", "initrd.img", *(d.name for d in files.disks)])


def test_kata_line_with_mem_share_and_initrd(files):
    argv = kata_line(files, shared_fs=True) + ["-initrd", str(files.initrd)]
    doc = printed(stratovirt(*argv, "-print-config"))
    assert doc["boot-source"]["initrd_fs_path"] == str(files.initrd)


def test_vhost_vsock_without_an_fd_prints_as_the_kernels(files):
    """Without vhostfd the launcher opens /dev/vhost-vsock itself; the JSON says vhost."""
    argv = kata_line(files) + ["-device", "vhost-vsock-device,id=vsock-id,guest-cid=3"]
    doc = printed(stratovirt(*argv, "-print-config"))
    assert doc["vsock"] == {"vsock_id": "vsock-id", "guest_cid": 3, "vhost": True}
    vsock = config.parse(argv).config.vsock
    assert (vsock.vhost, vsock.fd, vsock.socket) == (True, None, None)


@pytest.mark.parametrize("vhostfd,error", [
    ("2", "-device[3].vhostfd: 2 is stdio, not a vhost-vsock device; pass the vhost-vsock "
          "device as an extra file, numbered from 3"),
    ("999", "-device[3].vhostfd: 999 is not an open file descriptor; start stratovirt with "
            "the vhost-vsock device open as fd 999"),
    ("{null}", "-device[3].vhostfd: fd {null} is not /dev/vhost-vsock; pass /dev/vhost-vsock "
               "open for reading and writing"),
    ("{file}", "-device[3].vhostfd: fd {file} is not /dev/vhost-vsock; pass /dev/vhost-vsock "
               "open for reading and writing"),
    ("x", "-device[3].vhostfd: "),
])
def test_bad_vhostfd(files, vhostfd, error):
    with open("/dev/null", "rb") as null, open(files.kernel, "rb") as regular:
        numbers = {"null": str(null.fileno()), "file": str(regular.fileno())}
        result = stratovirt(*kata_line(files, vsock_fd=vhostfd.format(**numbers)))
    assert result.code == 2 and result.error.startswith(error.format(**numbers)), result


def test_two_vsocks_refused(files):
    argv = kata_line(files) + ["-device", "vhost-vsock-device,id=v1,guest-cid=3",
                               "-device", "vhost-vsock-device,id=v2,guest-cid=4"]
    assert stratovirt(*argv).error.startswith("-device[5]: 2 vsock devices given; at most 1")


def test_same_vm_in_both_forms_is_the_same_machine_config(files):
    api, console = files.dir / "api.sock", files.dir / "console.sock"
    disk0, disk1 = files.disks[:2]
    seed = ["-name", "vm1", "-kernel", str(files.kernel), "-append", "console=ttyS0 quiet",
            "-initrd", str(files.initrd), "-smp", "cpus=4", "-m", "1G",
            "-api-channel", f"unix:{api}", "-D", str(files.dir / "log"),
            "-drive", f"id=root,file={disk0},readonly=true,direct=false,serial=abc",
            "-drive", f"id=data,file={disk1}",
            "-netdev", "id=n0,netdev=tap0,mac=0E:90:DF:9F:A8:88",
            "-chardev", f"id=con,path={console}",
            "-serial", "stdio", "-omit_vm_memory", "-disable-seccomp"]
    two = ["-name", "vm1", "-kernel", str(files.kernel), "-append", "console=ttyS0 quiet",
           "-initrd", str(files.initrd), "-smp", "4", "-m", "1024",
           "-qmp", f"unix:{api},server,nowait", "-D", str(files.dir / "log"),
           "-machine", "type=microvm,dump-guest-core=off",
           "-drive", f"id=d0,file={disk0},readonly=on,direct=off",
           "-drive", f"id=d1,file={disk1}",
           "-device", "virtio-blk-device,drive=d0,id=root,serial=abc",
           "-device", "virtio-blk-device,drive=d1,id=data",
           "-netdev", "tap,id=net0,ifname=tap0",
           "-device", "virtio-net-device,netdev=net0,id=n0,mac=0E:90:DF:9F:A8:88",
           "-device", "virtio-serial-device,id=serial0",
           "-chardev", f"socket,id=chr0,path={console},server,nowait",
           "-device", "virtconsole,chardev=chr0,id=con,nr=0",
           "-serial", "stdio", "-disable-seccomp"]
    assert config.parse(two).config == config.parse(seed).config


def test_memory_unit_differs_between_the_forms(files):
    """2.x reads a plain -m as MiB (Kata writes MiB); the seed reads it as bytes."""
    two = kata_line(files)
    at = two.index("-m") + 1
    for text, size in (("1024", GiB), ("128", 128 * MiB), ("1024M", GiB), ("1G", GiB),
                       ("524288", 512 * GiB)):
        two[at] = text
        assert printed(stratovirt(*two, "-print-config"))["machine-config"]["mem_size"] == size
    assert stratovirt(*files.base(), "-m", "1024").error == (
        "-m: 1 KiB of memory is out of range; allowed 128 MiB..512 GiB "
        "(a plain number is bytes: for 1024 MiB write 1024M)")
    two[at] = str(256 * MiB)
    assert stratovirt(*two).error == (
        "-m: 262144 GiB of memory is out of range; allowed 128 MiB..512 GiB "
        "(a plain number is MiB here: for 268435456 bytes write 256)")
    # A suffixed size is no plain number: no hint about units in either form.
    assert stratovirt(*files.base(), "-m", "100K").error == (
        "-m: 100 KiB of memory is out of range; allowed 128 MiB..512 GiB")


@pytest.mark.parametrize("argv,marker", [
    (["-qmp", "unix:x,server,nowait"], "-qmp"),
    (["-kernel", "k", "-machine", "type=microvm"], "-machine"),
    (["-object", "rng-random,id=r,filename=/dev/urandom"], "-object"),
    (["-uuid", UUID], "-uuid"),
    (["-device", "virtio-blk-device,drive=d,id=b"], "-device virtio-blk-device"),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3"], "-device vhost-vsock-device"),
    (["-device", "virtconsole,chardev=c,id=v"], "-device virtconsole"),
    (["-netdev", "tap,id=n,ifname=tap0"], "-netdev tap"),
    (["-chardev", "socket,id=c,path=p,server,nowait"], "-chardev socket"),
    (["-kernel", "k", "-api-channel", "unix:a", "-device", "vsock,id=v,guest-cid=3",
      "-netdev", "id=n,netdev=tap0", "-chardev", "id=c,path=p", "-m", "1024"], None),
    (["-device", "virtio-rng,id=r"], None),
])
def test_how_a_2x_line_is_recognised(argv, marker):
    assert marker_2x(argv) == marker


@pytest.mark.parametrize("seed,error", [
    (["-api-channel", "unix:{dir}/api.sock"],
     "-api-channel: -api-channel is the seed form's, but -qmp is StratoVirt 2.x's; write the "
     "whole line in one form (in 2.x: -qmp unix:PATH,server,nowait)"),
    (["-omit_vm_memory"], "-omit_vm_memory: -omit_vm_memory is the seed form's, but -qmp is "
                          "StratoVirt 2.x's; write the whole line in one form (in 2.x: "
                          "-machine type=microvm,dump-guest-core=off)"),
    (["-config", "{dir}/c.json"], "-config: -config is the seed form's"),
    (["-device", "vsock,id=v,guest-cid=3"], "-device[0]: -device vsock is the seed form's, "
                                            "but -qmp is StratoVirt 2.x's"),
    (["-netdev", "id=n,netdev=tap0"], "-netdev[0]: -netdev id= is the seed form's, but -qmp"),
    (["-chardev", "id=c,path={dir}/c.sock"], "-chardev[0]: -chardev id= is the seed form's"),
])
def test_seed_option_in_a_2x_line_refused(files, seed, error):
    argv = ["-kernel", str(files.kernel), "-qmp", f"unix:{files.dir}/q.sock,server,nowait",
            *(word.format(dir=files.dir) for word in seed)]
    assert stratovirt(*argv).error.startswith(error)


def test_2x_option_in_a_seed_line_refused(files):
    assert stratovirt(*files.base(), "-machine", "type=microvm").error.startswith(
        "-api-channel: -api-channel is the seed form's, but -machine is StratoVirt 2.x's")
    assert stratovirt(*files.base(), "-drive", f"id=d,file={files.disks[0]}",
                      "-device", "virtio-blk-device,drive=d,id=b").error.startswith(
        "-api-channel: -api-channel is the seed form's, but -device virtio-blk-device is "
        "StratoVirt 2.x's")


def replace(argv: list[str], old: str, new: str | None) -> list[str]:
    """argv with the word `old` (a value) replaced, or dropped with its option."""
    at = argv.index(old)
    return argv[:at] + [new] + argv[at + 1:] if new is not None else argv[:at - 1] + argv[at + 1:]


@pytest.mark.parametrize("old,new,error", [
    ("virtio-blk-device,drive=rootfs,id=virtio-blk0", "virtio-blk-pci,drive=rootfs,id=b",
     '-device[2]: unknown driver "virtio-blk-pci"; the drivers are virtio-blk-device, '
     "virtio-net-device, virtio-serial-device, virtconsole, virtio-rng-device, "
     "vhost-vsock-device"),
    ("virtio-blk-device,drive=rootfs,id=virtio-blk0", "virtio-blk-device,drive=root,id=b",
     '-device[2].drive: no -drive has id "root"; add -drive '
     "id=root,file=PATH[,readonly=on|off][,direct=on|off]"),
    ("virtio-blk-device,drive=rootfs,id=virtio-blk0", None,
     '-drive[0]: no -device uses -drive "rootfs"; add -device '
     "virtio-blk-device,drive=rootfs,id=ID or drop it"),
    ("virtio-net-device,netdev=eth0,id=eth0,mac=02:42:ac:11:00:02",
     "virtio-net-device,netdev=eth1,id=eth0", '-device[3].netdev: no -netdev has id "eth1"'),
    ("virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
     "virtconsole,chardev=c9,id=virtio-console0", '-device[1].chardev: no -chardev has id "c9"'),
    ("virtio-blk-device,drive=rootfs,id=virtio-blk0", "virtio-blk-device,drive=rootfs,id=eth0",
     '-device[3].id: id "eth0" is also used by -device[2]; ids must be unique across devices'),
    ("virtio-blk-device,drive=rootfs,id=virtio-blk0", "virtio-blk-device,id=b",
     "-device[2].drive: missing; required: id, drive"),
    ("virtio-blk-device,drive=rootfs,id=virtio-blk0",
     "virtio-blk-device,drive=rootfs,id=b,iothread=t",
     "-device[2].iothread: unknown property; the properties are id, drive, serial"),
    ("virtio-serial-device,id=virtio-serial0", None,
     "-device[0]: virtconsole needs a -device virtio-serial-device"),
    ("virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
     "virtconsole,chardev=charconsole0,id=virtio-console0,nr=1",
     "-device[1].nr: port 1 is not supported; the console is port 0: write nr=0"),
    ("type=microvm,dump-guest-core=off", "type=q35,dump-guest-core=off",
     '-machine.type: "q35" is not supported; the only machine type is microvm'),
    ("type=microvm,dump-guest-core=off", "dump-guest-core=off",
     "-machine.type: missing; write -machine type=microvm,..."),
    ("type=microvm,dump-guest-core=off", "type=microvm,accel=kvm",
     "-machine.accel: unknown or repeated property"),
    ("type=microvm,dump-guest-core=off", "type=microvm,mem-share=off",
     "-machine.mem-share: off is not supported"),
    ("type=microvm,dump-guest-core=off", "type=microvm,dump-guest-core=maybe",
     '-machine.dump-guest-core: "maybe" is not a boolean'),
    ("2048", "0", "-m: 0 bytes of memory is out of range; allowed 128 MiB..512 GiB"),
    ("2048", "127", "-m: 127 MiB of memory is out of range; allowed 128 MiB..512 GiB"),
    ("2048", "524289", "-m: 524289 MiB of memory is out of range; allowed 128 MiB..512 GiB"),
    ("2048", "2T", '-m: "2T" is not a size'),
    ("1", "0", "-smp: 0 vCPUs is out of range; allowed 1..254"),
    ("1", "255", "-smp: 255 vCPUs is out of range; allowed 1..254"),
    ("1", "2,sockets=2", '-smp: "2,sockets=2" is not a vCPU count'),
    (UUID, "not-a-uuid", '-uuid: "not-a-uuid" is not a UUID'),
    ("tap,id=eth0,ifname=tap0_kata", "tap,id=eth0,fds=3:x",
     '-netdev[0].fds: "3:x" is not a list of file descriptors; write fds=FD[:FD...]'),
    ("tap,id=eth0,ifname=tap0_kata", "tap,id=eth0,fds=",
     '-netdev[0].fds: "" is not a list of file descriptors'),
    ("tap,id=eth0,ifname=tap0_kata", "tap,id=eth0",
     "-netdev[0]: needs ifname=TAP or fds=FD:FD..., one of them"),
    ("tap,id=eth0,ifname=tap0_kata", "vhost-user,id=eth0,chardev=c",
     '-netdev[0]: "vhost-user" is not supported; the only -netdev type is tap'),
    ("tap,id=eth0,ifname=tap0_kata", "tap,id=eth0,ifname=a/b",
     "-netdev[0].ifname: \"a/b\" is not a valid interface name"),
])
def test_bad_2x_input_is_one_line(files, old, new, error):
    assert stratovirt(*replace(kata_line(files), old, new)).error.startswith(error)


@pytest.mark.parametrize("qmp,error", [
    ("unix:{dir}/q.sock", "-qmp: needs server,nowait and nothing else"),
    ("unix:{dir}/q.sock,server", "-qmp: needs server,nowait and nothing else"),
    ("unix:{dir}/q.sock,server,nowait,wait", "-qmp: needs server,nowait and nothing else"),
    ("tcp:127.0.0.1:4444,server,nowait", "-qmp: a TCP QMP socket is not supported; "
                                         "write -qmp unix:/path/to/socket,server,nowait"),
    ("unix:,server,nowait", '-qmp: "unix:" is not a unix socket address'),
])
def test_qmp_refused(files, qmp, error):
    argv = replace(kata_line(files), f"unix:{files.dir}/qmp.socket,server,nowait",
                   qmp.format(dir=files.dir))
    assert stratovirt(*argv).error.startswith(error)


def test_chardev_needs_server_nowait(files):
    path = f"{files.dir}/console.socket"
    argv = replace(kata_line(files), f"socket,id=charconsole0,path={path},server,nowait",
                   f"socket,id=charconsole0,path={path}")
    assert stratovirt(*argv).error == (
        "-chardev[0].server: missing; required: id, path, server, nowait")


def test_duplicate_backend_ids_and_shared_backends(files):
    line = kata_line(files)
    assert stratovirt(*line, "-drive", f"id=rootfs,file={files.disks[1]}").error == (
        '-drive[1].id: id "rootfs" is also used by -drive[0]; give each -drive its own id')
    assert stratovirt(*line, "-device", "virtio-blk-device,drive=rootfs,id=b2").error == (
        '-device[4].drive: -drive "rootfs" is also used by -device[2]; '
        "give each device its own -drive")


def test_syntax_errors(files):
    line = kata_line(files)
    assert stratovirt(*replace(line, KERNEL_PARAMS, "console=hvc0"), "quiet").error == (
        '"quiet": is not an option; in the 2.x form every option takes one word: '
        'quote -append "..."')
    assert stratovirt(*line, "-smpp", "2").error.startswith(
        "-smpp: unknown option in a StratoVirt 2.x command line; did you mean -smp?")
    assert stratovirt(*line, "-name").error.startswith("-name: needs a value; write -name NAME")
    assert stratovirt(*line, "-name", "x").error == "-name: given 2 times; give it once"
    assert stratovirt(*replace(line, f"unix:{files.dir}/qmp.socket,server,nowait", None)
                      ).error.startswith("-qmp: missing")


def test_limits_are_the_seeds(files):
    line = kata_line(files)
    disks = [w for i in range(1, 7) for w in (
        "-drive", f"id=d{i},file={files.disks[i]},direct=off",
        "-device", f"virtio-blk-device,drive=d{i},id=blk{i}")]
    assert stratovirt(*line, *disks).error.startswith(
        "-device[9]: 7 disks given; at most 6 (hot-plugged ones included)")
    nics = [w for i in range(1, 3) for w in (
        "-netdev", f"tap,id=n{i},ifname=tap{i}",
        "-device", f"virtio-net-device,netdev=n{i},id=n{i}")]
    assert stratovirt(*line, *nics).error.startswith("-device[5]: 3 NICs given; at most 2")
    console = ["-device", "virtconsole,chardev=c2,id=con2,nr=0",
               "-chardev", f"socket,id=c2,path={files.dir}/c2.sock,server,nowait"]
    assert stratovirt(*line, *console).error.startswith("-device[4]: 2 consoles given; at most 1")


def test_log_option_with_and_without_a_file(files):
    line = kata_line(files)
    assert config.parse(line).config.log_file is None
    with_file = replace(line, "-D", "-D")
    at = with_file.index("-D") + 1
    with_file.insert(at, str(files.dir / "vm.log"))
    assert config.parse(with_file).config.log_file == files.dir / "vm.log"


def test_help_in_a_2x_line(files):
    result = stratovirt(*kata_line(files), "--help")
    assert result.code == 0 and "StratoVirt 2.x's command line" in result.out


def test_real_program_error_is_one_line_and_leaves_nothing(files):
    before = sorted(os.listdir(files.dir))
    argv = replace(kata_line(files), "1", "999")
    result = stratovirt_process(*argv, cwd=files.dir)
    assert result.error == "-smp: 999 vCPUs is out of range; allowed 1..254"
    assert "Traceback" not in result.err
    assert sorted(os.listdir(files.dir)) == before


def test_a_seed_line_does_not_import_the_2x_reader(files):
    code = ("import sys; from vmm import config; config.parse(sys.argv[1:]); "
            "print('vmm.config.cmdline2x' in sys.modules)")
    seed = subprocess.run([sys.executable, "-c", code, *files.base()], capture_output=True,
                          text=True, check=True)
    two = subprocess.run([sys.executable, "-c", code, *kata_line(files)], capture_output=True,
                         text=True, check=True)
    assert (seed.stdout, two.stdout) == ("False\n", "True\n")


OPTIONS_2X = ["-name", "-uuid", "-smp", "-m", "-kernel", "-append", "-initrd", "-qmp", "-D",
              "-disable-seccomp", "-machine", "-object", "-device", "-drive", "-netdev",
              "-chardev", "-serial", "-daemonize", "-pidfile", "-api-channel"]
WORDS_2X = ["unix:q.sock,server,nowait", "tcp:1:2,server,nowait", "type=microvm",
            "microvm,dump-guest-core=off,mem-share=on", "virtio-blk-device,drive=d,id=b",
            "virtio-net-device,netdev=n,id=n", "virtio-serial-device,id=s", "tap,id=n,fds=3:",
            "virtconsole,chardev=c,id=v,nr=0", "socket,id=c,path=c.sock,server,nowait",
            "id=d,file=d0,readonly=on,direct=off", "tap,id=n,ifname=tap0", "rng-random,id=r",
            "virtio-rng-device,rng=r,id=r", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=x",
            "vmlinux", "1024", "2", "", ",", "=", "id=", "vsock,id=v,guest-cid=3", UUID]


@pytest.fixture(scope="module")
def pool_2x(tmp_path_factory):
    top = tmp_path_factory.mktemp("pool2x")
    (top / "vmlinux").write_bytes(tiny_guest().read_bytes())
    (top / "d0").write_bytes(bytes(4096))
    old = os.getcwd()
    os.chdir(top)
    yield top
    os.chdir(old)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=st.lists(st.sampled_from(OPTIONS_2X) | st.sampled_from(WORDS_2X) | st.text(
    max_size=12), max_size=16))
def test_generated_2x_lines_end_in_0_or_one_line_2(pool_2x, argv):
    before = sorted(os.listdir(pool_2x))
    result = stratovirt("-qmp", "unix:q.sock,server,nowait", *argv, "-print-config")
    assert "Traceback" not in result.err
    if result.code != 0:
        assert result.error
    assert sorted(os.listdir(pool_2x)) == before


def test_2x_print_config_round_trips_through_the_seed_json(files):
    """-D (alone here: the log on stdout) has no JSON key, as in the seed's form."""
    first = config.parse(kata_line(files, rng=True)).config
    path = files.write_json(json.loads(stratovirt(*kata_line(files, rng=True),
                                                  "-print-config").out))
    again = config.parse(["-config", str(path), "-api-channel",
                          f"unix:{files.dir}/qmp.socket", "-disable-seccomp"]).config
    assert again == dataclasses.replace(first, log_stdout=False) and again.rng


RNG_DEVICE = "virtio-rng-device,rng=objrng0,id=virtio-rng0"


@pytest.mark.parametrize("old,new,error", [
    (RNG_DEVICE, RNG_DEVICE + ",max-bytes=0",
     "-device[0].max-bytes: 0 bytes is out of range; allowed 1..9223372036854775807"),
    (RNG_DEVICE, RNG_DEVICE + ",period=0", "-device[0].period: 0 ms is out of range; "
                                           "allowed 1..3600000"),
    (RNG_DEVICE, RNG_DEVICE + ",max-bytes=-5", "-device[0].max-bytes: "),
    (RNG_DEVICE, RNG_DEVICE + ",period=soon", "-device[0].period: "),
    (RNG_DEVICE, RNG_DEVICE + ",max-bytes=63,period=1000",
     "-device[0].max-bytes: 63 bytes per 1000 ms is 63 bytes/s; allowed 64..1000000000 "
     "bytes/s (max-bytes * 1000 / period)"),
    (RNG_DEVICE, RNG_DEVICE + ",max-bytes=1000000001",
     "-device[0].max-bytes: 1000000001 bytes per 1000 ms is 1000000001 bytes/s; allowed"),
    (RNG_DEVICE, RNG_DEVICE + ",max-bytes=9223372036854775808", "-device[0].max-bytes: "),
    ("rng-random,id=objrng0,filename=/dev/urandom", "rng-random,id=objrng0,filename=/nowhere",
     '-object[0].filename: entropy source "/nowhere": No such file or directory; give a '
     "character device such as /dev/urandom"),
    ("rng-random,id=objrng0,filename=/dev/urandom", "rng-random,id=objrng0,filename=/etc/hostname",
     '-object[0].filename: entropy source "/etc/hostname" is not a character device; give a '
     "character device such as /dev/urandom"),
    ("rng-random,id=objrng0,filename=/dev/urandom", "rng-egd,id=objrng0,chardev=c",
     '-object[0]: "rng-egd" is not supported; the only -object type is rng-random'),
    (RNG_DEVICE, "virtio-rng-device,rng=other,id=virtio-rng0",
     '-device[0].rng: no -object has id "other"'),
])
def test_bad_rng_is_one_line(files, old, new, error):
    result = stratovirt(*replace(kata_line(files, rng=True), old, new))
    assert result.code == 2 and result.error.startswith(error), result
    assert sorted(os.listdir(files.dir)) == sorted(
        ["vmlinux.bin", "initrd.img", *(d.name for d in files.disks)])


def test_two_rngs_refused(files):
    argv = kata_line(files, rng=True) + [
        "-object", "rng-random,id=objrng1,filename=/dev/random",
        "-device", "virtio-rng-device,rng=objrng1,id=virtio-rng1"]
    assert stratovirt(*argv).error == ("-device[5]: 2 rng devices given; at most 1 (one "
                                       "virtio-rng, besides the console and vsock)")


def test_rng_in_the_json_file_for_a_seed_line(files):
    """The seed's command line has no rng: its JSON file does, with the same checks."""
    rng = files.dir / "rng.json"
    rng.write_text(json.dumps({"rng": {"rng_id": "r0", "random_file": "/dev/random",
                                       "max_bytes": 1024, "period": 100}}))
    doc = printed(stratovirt(*files.base(), "-config", str(rng), "-print-config"))
    assert doc["rng"] == {"rng_id": "r0", "random_file": "/dev/random", "max_bytes": 1024,
                          "period": 100}
    rng.write_text(json.dumps({"rng": {"rng_id": "r0", "random_file": "/dev/random",
                                       "period": 0}}))
    assert stratovirt(*files.base(), "-config", str(rng)).error == (
        "rng.period: 0 ms is out of range; allowed 1..3600000")


def test_log_alone_is_stdout_and_not_for_a_daemon(files):
    argv = [*kata_line(files), "-daemonize", "-pidfile", str(files.dir / "pid")]
    assert stratovirt(*argv).error == ("-D: -D without a file logs to stdout, which a daemon "
                                       "does not have; give -D PATH or drop -daemonize")
    assert config.parse(kata_line(files)).config.log_stdout
    with_file = [word for word in kata_line(files) if word != "-D"] + ["-D", str(files.dir / "log")]
    assert not config.parse(with_file).config.log_stdout


@pytest.fixture
def tap_fd():
    """A tap opened the way Kata opens one, in a network namespace of its own."""
    with Netns("vmmfd") as ns:
        ns.add_tap("tap7")
        fd = ns.call(tap.open_tap, "tap7")
        yield fd
        os.close(fd)


@pytest.mark.needs_root
def test_tap_passed_as_an_fd(files, tap_fd):
    doc = printed(stratovirt(*kata_line(files, tap_fds=str(tap_fd)), "-print-config"))
    assert doc["net"] == [{"iface_id": "eth0", "host_dev_name": "tap7",
                           "mac": "02:42:ac:11:00:02"}]
    nic = config.parse(kata_line(files, tap_fds=str(tap_fd))).config.nics[0]
    assert (nic.tap, nic.fd) == ("tap7", tap_fd)


@pytest.mark.needs_root
def test_two_nics_on_one_fd_refused(files, tap_fd):
    argv = kata_line(files, tap_fds=str(tap_fd)) + [
        "-netdev", f"tap,id=eth1,fds={tap_fd}",
        "-device", "virtio-net-device,netdev=eth1,id=eth1"]
    assert stratovirt(*argv).error == (
        f'-netdev[1].fds: file descriptor {tap_fd} is also used by -netdev[0].fds; give each '
        "device its own file descriptor")


@pytest.mark.parametrize("fds,error", [
    ("1", "-netdev[0].fds: 1 is stdio, not a tap; pass the tap as an extra file, numbered "
          "from 3"),
    ("999", "-netdev[0].fds: 999 is not an open file descriptor; start stratovirt with the "
            "tap open as fd 999"),
    ("{file}", "-netdev[0].fds: fd {file} cannot be the NIC's tap: tap fd {file}: not a tap "
               "(Inappropriate ioctl for device); pass a tap opened with IFF_TAP | IFF_NO_PI | "
               "IFF_VNET_HDR"),
    ("3:4", "-netdev[0].fds: 2 file descriptors given; give one: a NIC has one queue pair "
            "here (one tap queue)"),
    ("x", '-netdev[0].fds: "x" is not a list of file descriptors; write fds=FD[:FD...], '
          "each a decimal number"),
])
def test_bad_tap_fds(files, fds, error):
    with open(files.kernel, "rb") as regular:
        number = str(regular.fileno())
        result = stratovirt(*kata_line(files, tap_fds=fds.format(file=number)))
    assert result.code == 2 and result.error == error.format(file=number)
