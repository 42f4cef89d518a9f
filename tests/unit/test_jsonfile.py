"""The -config JSON file of spec.md, strict errors with JSON paths, and merging."""

import json

import pytest

from tests.framework.cli import stratovirt


def spec_example(files) -> dict:
    """spec.md's example file, with real paths."""
    return {
        "boot-source": {
            "kernel_image_path": str(files.kernel),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off tsc=reliable ipv6.disable=1 "
                         "root=/dev/vda quiet"},
        "machine-config": {"name": "abc", "vcpu_count": 2, "mem_size": 268435456,
                           "omit_vm_memory": False},
        "drive": [{"drive_id": "rootfs", "path_on_host": str(files.disks[0]), "direct": True,
                   "read_only": False, "serial_num": "abcd"}],
        "net": [{"iface_id": "net0", "host_dev_name": "tap0", "mac": "0e:90:df:9f:a8:88"}],
        "console": {"console_id": "charconsole0", "socket_path": str(files.console)},
        "serial": {"stdio": True},
        "vsock": {"vsock_id": "vsock-123321132", "guest_cid": 4},
    }


def run(files, document, *argv):
    return stratovirt("-config", str(files.write_json(document)),
                      "-api-channel", f"unix:{files.api}", *argv, "-print-config")


def test_spec_example_accepted_and_printed_back(files):
    document = spec_example(files)
    result = run(files, document)
    assert result.code == 0, result
    assert json.loads(result.out) == document


def test_sections_are_optional_when_the_command_line_gives_the_kernel(files):
    result = stratovirt("-config", str(files.write_json({})), *files.base(), "-print-config")
    assert result.code == 0, result


@pytest.mark.parametrize("mutate,error", [
    (lambda d: d.update(cpu={}), "cpu: unknown key; the keys are boot-source, machine-config"),
    (lambda d: d["machine-config"].update(cpus=2),
     "machine-config.cpus: unknown key; the keys are name, vcpu_count, mem_size, omit_vm_memory"),
    (lambda d: d["machine-config"].update(vcpu_count="2"),
     "machine-config.vcpu_count: is a string; a whole number is expected"),
    (lambda d: d["machine-config"].update(vcpu_count=True),
     "machine-config.vcpu_count: is a boolean; a whole number is expected"),
    (lambda d: d["machine-config"].update(vcpu_count=2.0),
     "machine-config.vcpu_count: is a fractional number; a whole number is expected"),
    (lambda d: d["machine-config"].update(vcpu_count=0),
     "machine-config.vcpu_count: 0 vCPUs is out of range; allowed 1..254"),
    (lambda d: d["machine-config"].update(mem_size="256M"),
     "machine-config.mem_size: is a string; a whole number is expected"),
    (lambda d: d["machine-config"].update(mem_size=64 << 20),
     "machine-config.mem_size: 64 MiB of memory is out of range; allowed 128 MiB..512 GiB"),
    (lambda d: d["machine-config"].pop("name"),
     "machine-config.name: missing; machine-config requires name, vcpu_count, mem_size"),
    (lambda d: d["drive"].append({"drive_id": "d1", "read_only": True, "direct": True}),
     "drive[1].path_on_host: missing; drive[1] requires drive_id, path_on_host, read_only, direct"),
    (lambda d: d["drive"][0].update(read_only="no"),
     "drive[0].read_only: is a string; true or false is expected"),
    (lambda d: d.update(drive={"drive_id": "x"}), "drive: is an object; a list of objects"),
    (lambda d: d["drive"].append(5), "drive[1]: is a number; an object with the keys drive_id"),
    (lambda d: d.update(net=[None]), "net[0]: is null; an object with the keys iface_id"),
    (lambda d: d["net"][0].update(mac="ff:ff:ff:ff:ff:ff"), "net[0].mac: ff:ff:ff:ff:ff:ff is a multicast"),
    (lambda d: d["net"][0].update(host_dev_name="a/b"), "net[0].host_dev_name: \"a/b\" is not a valid"),
    (lambda d: d["vsock"].update(guest_cid=2), "vsock.guest_cid: 2 as guest CID is out of range; allowed 3..4294967294"),
    (lambda d: d["console"].update(socket_path=d["drive"][0]["path_on_host"]),
     "console.socket_path: console socket"),
    (lambda d: d["serial"].update(stdio="yes"), "serial.stdio: is a string; true or false"),
    (lambda d: d["boot-source"].update(kernel_image_path="/nope"),
     'boot-source.kernel_image_path: kernel "/nope": No such file'),
    (lambda d: d["boot-source"].update(initrd_fs_path=7), "boot-source.initrd_fs_path: is a number"),
    (lambda d: d["boot-source"].update(boot_args="a\u0000b"), "boot-source.boot_args: \"a\\u0000b\" contains a NUL"),
    (lambda d: d["drive"][0].update(drive_id="vsock-123321132"),
     'vsock.vsock_id: id "vsock-123321132" is also used by drive[0]'),
    (lambda d: d["drive"].extend({"drive_id": f"d{i}", "path_on_host": d["drive"][0]["path_on_host"],
                                  "read_only": True, "direct": False} for i in range(6)),
     "drive[6]: 7 disks given; at most 6 (hot-plugged ones included)"),
])
def test_refused_with_json_path(files, mutate, error):
    document = spec_example(files)
    mutate(document)
    result = run(files, document)
    assert result.error.startswith(error), result.error


def test_lone_surrogate_refused(files):
    text = json.dumps(spec_example(files)).replace('"abc"', '"\\ud800"')
    assert run(files, text).error.startswith('machine-config.name: "\\ud800" is not valid text')


@pytest.mark.parametrize("text,error", [
    ('{"machine-config": {"name": "a",}}', "line 1, column 33: Expecting property name"),
    ('{\n  "drive": [\n    {"drive_id": "a"\n    "x": 1}]}', "line 4, column 5: Expecting ',' delimiter"),
    ("", "line 1, column 1: Expecting value"),
    ('{"vsock": {"vsock_id": "v", "guest_cid": NaN}}', "NaN: is not a JSON number"),
    ('{"serial": {"stdio": true, "stdio": false}}', '"stdio": appears twice in one JSON object'),
    ("[]", "the document is a list; a JSON object"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"vsock": {"vsock_id": "v", "guest_cid": ' + "9" * 5000 + "}}", "digits"),
])
def test_malformed_json(files, text, error):
    assert error in run(files, text).error


def test_not_utf8(files):
    path = files.dir / "bad.json"
    path.write_bytes(b'{"serial": {"stdio": true}, "x": "\xff"}')
    result = stratovirt("-config", str(path), *files.base(), "-print-config")
    assert result.error == f"{path}: byte 34 is not UTF-8; write the file in UTF-8"


def test_missing_file(files):
    assert stratovirt("-config", "/no/such.json", *files.base()).error == \
        '-config: cannot read "/no/such.json": No such file or directory; give an existing, readable JSON file'


def test_command_line_wins_and_says_so(files):
    document = spec_example(files)
    result = run(files, document, "-smp", "4", "-name", "abc", "-m", "1G")
    assert result.code == 0, result
    printed = json.loads(result.out)["machine-config"]
    assert printed["vcpu_count"] == 4 and printed["mem_size"] == 1 << 30
    notes = result.err.splitlines()
    assert "stratovirt: note: -smp 4 overrides machine-config.vcpu_count=2" in notes
    assert "stratovirt: note: -m 1073741824 overrides machine-config.mem_size=268435456" in notes
    assert not any("-name" in line for line in notes)  # same value: nothing overridden


def test_command_line_devices_replace_by_id_and_add_others(files):
    document = spec_example(files)
    result = run(files, document,
                 "-drive", f"id=rootfs,file={files.disks[1]},readonly=on",
                 "-drive", f"id=data,file={files.disks[2]}",
                 "-netdev", "id=net1,netdev=tap1",
                 "-chardev", f"id=con,path={files.dir}/other.sock",
                 "-device", "vsock,id=vsock9,guest-cid=9")
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert [(d["drive_id"], d["path_on_host"], d["read_only"]) for d in doc["drive"]] == [
        ("rootfs", str(files.disks[1]), True), ("data", str(files.disks[2]), False)]
    assert [n["iface_id"] for n in doc["net"]] == ["net0", "net1"]
    assert doc["console"]["console_id"] == "con" and doc["vsock"]["guest_cid"] == 9
    assert 'stratovirt: note: -drive[0] replaces drive[0] (id "rootfs")' in result.err.splitlines()
    assert ('stratovirt: note: -chardev[0] replaces console (id "charconsole0")'
            in result.err.splitlines())


def test_two_command_line_drives_with_one_id_still_clash(files):
    document = spec_example(files)
    result = run(files, document, "-drive", f"id=rootfs,file={files.disks[1]}",
                 "-drive", f"id=rootfs,file={files.disks[2]}")
    assert result.error.startswith('-drive[1].id: id "rootfs" is also used by -drive[0]')


def test_omit_vm_memory_flag_overrides_file(files):
    document = spec_example(files)
    result = run(files, document, "-omit_vm_memory")
    assert json.loads(result.out)["machine-config"]["omit_vm_memory"] is True
    assert "-omit_vm_memory true overrides machine-config.omit_vm_memory=false" in result.err
