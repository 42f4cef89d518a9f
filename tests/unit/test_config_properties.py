"""Property tests: generated command lines and JSON documents never crash the parser,
and every valid configuration survives -print-config -> -config unchanged."""

import json
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm import config
from vmm.config import cmdline, render
from tests.framework.cli import stratovirt
from tests.framework.guest import tiny_guest

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A directory of real files that generated configurations may point at."""
    top = tmp_path_factory.mktemp("pool")
    (top / "vmlinux").write_bytes(tiny_guest().read_bytes())
    for name in ("initrd", "d0", "d1", "d2", "d3", "d4", "d5", "d6"):
        (top / name).write_bytes(bytes(4096))
    (top / "sub").mkdir()
    old = os.getcwd()
    os.chdir(top)
    yield top
    os.chdir(old)


def snapshot(top):
    return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(top))


def check_outcome(result, expect_json: bool):
    assert "Traceback" not in result.err
    if result.code == 2:
        assert result.error  # exactly one line, in the documented form
    else:
        assert result.code == 0, result
        if expect_json:
            json.loads(result.out)


OPTIONS = ["-config", "-name", "-kernel", "-append", "-initrd", "-smp", "-m", "-drive",
           "-netdev", "-chardev", "-device", "-api-channel", "-serial", "-D", "-pidfile",
           "-daemonize", "-disable-seccomp", "-omit_vm_memory"]
PATHS = ["vmlinux", "initrd", "d0", "d1", "sub", "missing", "sub/x.sock", "/", "", "none/x"]
KEYS = ["id", "file", "readonly", "direct", "serial", "netdev", "mac", "path", "guest-cid",
        "cpus", "vsock", "unix", "stdio"]
text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]) | st.sampled_from(
    ",=:\n\0 -"), max_size=20)
values = st.one_of(
    st.sampled_from(PATHS), text, st.integers(-5, 1 << 40).map(str),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 600), st.sampled_from(
        ["", "K", "M", "G", "KiB", "MiB", "GiB", "T", "m", ".5G"])),
    st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(PATHS) | text),
             max_size=5).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv)),
    st.sampled_from(["unix:api.sock", "unix:sub/api.sock", "vsock,id=v,guest-cid=3", "stdio",
                     "id=d,file=d0", "id=n,netdev=tap0,mac=02:00:00:00:00:01"]),
)
argv_lists = st.lists(st.one_of(st.sampled_from(OPTIONS), values), max_size=16)


@SETTINGS
@given(argv=argv_lists)
def test_generated_command_lines_end_in_0_or_one_line_2(pool, argv):
    before = snapshot(pool)
    result = stratovirt(*argv, "-print-config")
    check_outcome(result, expect_json=True)
    assert snapshot(pool) == before


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 41),
                         st.floats(allow_nan=False), st.sampled_from(PATHS), text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=8)
FIELDS = ["kernel_image_path", "boot_args", "initrd_fs_path", "name", "vcpu_count", "mem_size",
          "omit_vm_memory", "drive_id", "path_on_host", "read_only", "direct", "serial_num",
          "iface_id", "host_dev_name", "mac", "console_id", "socket_path", "vsock_id",
          "guest_cid", "stdio"]
field_values = st.one_of(json_scalars, st.integers(1, 300), st.sampled_from(
    [True, False, 268435456, 3, "tap0", "02:00:00:00:00:01"]))
sections = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6)
documents = st.dictionaries(
    st.sampled_from(["boot-source", "machine-config", "drive", "net", "console", "vsock",
                     "serial", "other"]),
    st.one_of(sections, st.lists(sections, max_size=3), json_values), max_size=7)


@SETTINGS
@given(document=documents | json_values)
def test_generated_json_documents_end_in_0_or_one_line_2(pool, document):
    path = pool / "generated.json"
    path.write_text(json.dumps(document))
    before = snapshot(pool)
    result = stratovirt("-config", str(path), "-api-channel", "unix:api.sock", "-print-config")
    check_outcome(result, expect_json=True)
    assert snapshot(pool) == before


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_as_a_config_file(pool, raw):
    path = pool / "raw.json"
    path.write_bytes(raw)
    check_outcome(stratovirt("-config", str(path), "-api-channel", "unix:api.sock",
                             "-print-config"), expect_json=True)


# Valid configurations, for the round trip.
ids = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,10}", fullmatch=True)
macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: [b[0] & 0xFE | 0x02, *b[1:]]).map(lambda b: ":".join(f"{x:02X}" for x in b))


@st.composite
def valid_command_lines(draw):
    argv = ["-kernel", "vmlinux", "-api-channel", "unix:api.sock"]
    if draw(st.booleans()):
        argv += ["-append", *draw(st.lists(st.text(string.ascii_letters + "=/.", min_size=1),
                                           min_size=1, max_size=5))]
    if draw(st.booleans()):
        argv += ["-initrd", "initrd"]
    if draw(st.booleans()):
        # A name that is an option's word reads as that option with -name's value
        # missing (cmdline._prepare), which is a mistake, not a valid line.
        argv += ["-name", draw(st.text(st.characters(whitelist_categories=["L", "N", "P", "S"]),
                                       min_size=1, max_size=30).filter(
                                           lambda name: name not in cmdline._KNOWN))]
    argv += ["-smp", str(draw(st.integers(1, 254)))]
    argv += ["-m", f"{draw(st.integers(128 * 256, 512 * 1024 * 256)) * 4}K"]
    chosen = draw(st.lists(ids, max_size=9, unique_by=str.lower))
    device_ids = iter(chosen)
    for disk in [f"d{i}" for i in range(draw(st.integers(0, 6)))]:
        dev = next(device_ids, None)
        if dev is None:
            break
        spec = f"id={dev},file={disk},readonly={draw(st.booleans())},direct={draw(st.booleans())}"
        if draw(st.booleans()):
            spec += f",serial={draw(st.text(string.ascii_letters + string.digits, min_size=1, max_size=20))}"
        argv += ["-drive", spec]
    for index in range(draw(st.integers(0, 2))):
        dev = next(device_ids, None)
        if dev is None:
            break
        spec = f"id={dev},netdev=tap{index}"
        if draw(st.booleans()):
            spec += f",mac={draw(macs)}"
        argv += ["-netdev", spec]
    if draw(st.booleans()) and (dev := next(device_ids, None)):
        argv += ["-chardev", f"id={dev},path=console.sock"]
    if draw(st.booleans()) and (dev := next(device_ids, None)):
        argv += ["-device", f"vsock,id={dev},guest-cid={draw(st.integers(3, 0xFFFFFFFE))}"]
    for flag in ("-omit_vm_memory", "-disable-seccomp"):
        if draw(st.booleans()):
            argv.append(flag)
    if draw(st.booleans()):
        argv += ["-serial", "stdio"]
    return argv


def round_trip(argv):
    first = config.parse(argv).config
    path = "roundtrip.json"
    with open(path, "w") as f:
        f.write(render.to_json(first))
    again = ["-config", path, "-api-channel", "unix:api.sock"]
    if not first.seccomp:
        again.append("-disable-seccomp")
    second = config.parse(again).config
    assert second == first
    assert render.to_document(second) == render.to_document(first)


@SETTINGS
@given(argv=valid_command_lines())
def test_print_config_round_trips(pool, argv):
    round_trip(argv)


def test_round_trip_of_every_device_kind(pool):
    round_trip(["-kernel", "vmlinux", "-append", "console=ttyS0", "root=/dev/vda",
                "-initrd", "initrd", "-name", "vm 1", "-smp", "cpus=4", "-m", "5G",
                "-drive", "id=rootfs,file=d0,serial=abc,direct=off",
                "-drive", "id=ro,file=d1,readonly=on",
                "-netdev", "id=net0,netdev=tap0,mac=0E:90:DF:9F:A8:88",
                "-netdev", "id=net1,netdev=tap1",
                "-chardev", "id=con0,path=console.sock", "-device", "vsock,id=v0,guest-cid=3",
                "-serial", "stdio", "-omit_vm_memory", "-api-channel", "unix:api.sock"])


@SETTINGS
@given(argv=argv_lists | valid_command_lines())
def test_the_command_line_is_read_as_click_reads_it(argv):
    """A command line without --help or --version is read without click (cmdline._values,
    for start-up time); click, given the same words, returns the same values."""
    try:
        args = cmdline._prepare(argv)
    except config.ConfigError:
        return
    values = cmdline._values(args)
    assert values == cmdline.command().main(args=args, prog_name="stratovirt",
                                            standalone_mode=False)
