"""The command-line front end: StratoVirt's single-dash options -> Draft.

click declares the options and renders --help and --version; two things click cannot
express are done before it sees argv: `-append` takes every following word up to the
next option (the seed's unquoted example), and an option directly followed by another
option is reported as missing its value instead of swallowing that option.
Single-valued options are declared `multiple` so a repeated one is an error rather
than a silent last-one-wins.

That check (_prepare) leaves click nothing to find wrong: every word is a known option,
its value or -append's words. So a command line without --help or --version is read
into the values click would give without importing click (~15 ms of a VM's start,
docs/performance.md); the two agree on every command line (tests/unit/test_cmdline.py).
"""

import functools

from .. import __version__
from . import limits as L
from . import ratelimit
from .draft import Draft, Item, Setting
from .errors import ConfigError
from .schema import DEVICE_LISTS, DEVICE_OBJECTS, SECTIONS
from .values import (SIZE_HELP, check_text, memory_out_of_range, parse_bool, parse_int,
                     parse_serial, parse_size, parse_smp, show, split_properties)

_EPILOG = f"""\b
Kernel formats: an uncompressed ELF vmlinux (64-bit entry, or the PVH entry note)
and a bzImage (Linux boot protocol 2.06 or newer).
\b
Limits (x86_64 microVM): {L.VCPUS[0]}..{L.VCPUS[1]} vCPUs, 128 MiB..512 GiB of memory
(a multiple of 4 KiB), 0..{L.MAX_DRIVES} disks, 0..{L.MAX_NICS} NICs, at most
{L.MAX_OTHER_DEVICES} other devices (one console, one vsock).
\b
Device ids: 1..{L.ID_CHARS[1]} characters, a letter first, then letters, digits, '-', '.', '_';
unique across all devices. In -drive and the like, ',,' stands for a comma in a value.
\b
-config FILE: the JSON file of the StratoVirt guide, with the keys boot-source,
machine-config, drive, net, console, vsock, serial. Options given on the command
line win over the file (the log says which); a -drive or -netdev whose id is in the
file replaces that entry, others are added after the file's. Relative paths are
taken from the current directory. -print-config shows the result in this schema.
{{json_keys}}
\b
StratoVirt 2.x's command line, as Kata Containers writes it (-qmp, -machine,
-device virtio-blk-device with its -drive, ...), is read too, one form per line; in
it -m N is N MiB. See docs/configuration.md.
\b
Errors: one line on stderr, exit status 2; nothing is created on disk.
"""



def _json_keys() -> str:
    """The JSON schema for --help, written from the same table the parser reads."""
    lines = ["\b", "JSON keys (? marks optional ones):"]

    def keys(entries):
        return ", ".join(k.json + ("" if k.required else "?") for k in entries)

    for section, entries in SECTIONS.items():
        lines.append(f"  {section}: {{{keys(entries)}}}")
    for section, (_, entries) in DEVICE_LISTS.items():
        lines.append(f"  {section}: [{{{keys(entries)}}}, ...]")
    for section, (_, entries) in DEVICE_OBJECTS.items():
        lines.append(f"  {section}: {{{keys(entries)}}}")
    return "\n".join(lines)


_VALUE_OPTIONS = {
    # option: (metavar, help)
    "-config": ("PATH", "Read the VM configuration from this JSON file."),
    "-name": ("NAME", f"VM name, {L.NAME_CHARS[0]}..{L.NAME_CHARS[1]} printable characters "
                      f"(default {L.DEFAULT_NAME})."),
    "-kernel": ("PATH", "Kernel image: ELF vmlinux or bzImage."),
    "-append": ("ARGS", "Kernel command line, quoted or as the words up to the next option; "
                        f"at most {L.BOOT_ARGS_BYTES} bytes."),
    "-initrd": ("PATH", "initrd (initramfs) file."),
    "-smp": ("[cpus=]N", f"Number of vCPUs, {L.VCPUS[0]}..{L.VCPUS[1]} (default {L.DEFAULT_VCPUS})."),
    "-m": ("SIZE", f"Memory, 128 MiB..512 GiB, a multiple of 4 KiB (default 256 MiB): "
                   f"{SIZE_HELP}."),
    "-drive": ("id=ID,file=PATH[,readonly=BOOL][,direct=BOOL][,serial=S]"
               "[,throttling.iops-total=N][,throttling.bps-total=N]",
               f"A virtio-blk disk; repeatable, 0..{L.MAX_DRIVES}. readonly defaults to false, "
               f"direct (O_DIRECT) to true, serial is 1..{L.DRIVE_SERIAL_BYTES[1]} printable "
               "ASCII characters. throttling.iops-total and throttling.bps-total limit "
               "requests and bytes per second (QEMU's names; also -max and -max-length "
               "bursts; docs/limits.md)."),
    "-netdev": ("id=ID,netdev=TAP[,mac=MAC][,throttling.rx-bps=N][,throttling.tx-pps=N]...",
                f"A virtio-net NIC on host tap TAP (1..{L.TAP_NAME_BYTES[1]} bytes, no '/', ':' "
                f"or whitespace); repeatable, 0..{L.MAX_NICS}. MAC: six hex pairs with ':', "
                "unicast. throttling.{rx,tx}-{bps,pps} limit bytes and frames per second "
                "each way (also -max and -max-length bursts; docs/limits.md)."),
    "-chardev": ("id=ID,path=SOCKET", "A virtio-console on a unix socket that must not exist "
                                      "yet; one client at a time; at most one."),
    "-device": ("vsock,id=ID,guest-cid=CID",
                f"A vsock device; CID {L.GUEST_CID[0]}..{L.GUEST_CID[1]:#x}; at most one."),
    "-api-channel": ("unix:SOCKET", "QMP control socket; required; the path must not exist yet."),
    "-serial": ("stdio", "ttyS0 on the VMM's stdin/stdout."),
    "-D": ("PATH", "Log file (appended to; created if missing)."),
    "-metrics": ("PATH", "Write the VM's disk and NIC figures here as Prometheus text, "
                         "replaced atomically every 5 s (node_exporter's textfile "
                         "collector), removed at exit; docs/metrics.md."),
    "-pidfile": ("PATH", "PID file, only with -daemonize; must not exist yet."),
    "-backend-restart": ("restarts=N[,window=SECONDS]",
                         "A device backend that dies is restarted, at most N times in any "
                         f"window (N {L.BACKEND_RESTARTS[0]}..{L.BACKEND_RESTARTS[1]}, default "
                         f"{L.DEFAULT_BACKEND_RESTARTS}; 0: never; window "
                         f"{L.BACKEND_RESTART_WINDOW[0]}..{L.BACKEND_RESTART_WINDOW[1]} s, "
                         f"default {L.DEFAULT_BACKEND_RESTART_WINDOW}); the next death fails "
                         "the device."),
}
_REPEATABLE = ("-drive", "-netdev", "-chardev", "-device")
_FLAGS = {
    "-daemonize": "Run as a background daemon (not with -serial stdio).",
    "-disable-seccomp": "Do not install the seccomp filters (they are on by default).",
    "-omit_vm_memory": "Leave guest memory out of core dumps (MADV_DONTDUMP).",
    "-print-config": "Validate, print the normalized configuration as -config JSON, exit.",
}
_HELP_OPTIONS = ("-h", "-help", "--help")
_VERSION_OPTIONS = ("-version", "--version")


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


@functools.cache
def command():
    """The click command (--help, --version), built on first use."""
    import click
    params = [click.Option([opt, _dest(opt)], metavar=meta, help=text, multiple=True)
              for opt, (meta, text) in _VALUE_OPTIONS.items()]
    params += [click.Option([opt, _dest(opt)], is_flag=True, help=text)
               for opt, text in _FLAGS.items()]
    command = click.Command(
        "stratovirt", params=params, callback=lambda **values: values,
        help="Start a KVM microVM, configured like StratoVirt's x86_64 microVM.",
        epilog=_EPILOG.replace("{json_keys}", _json_keys()), no_args_is_help=False,
        context_settings={"help_option_names": list(_HELP_OPTIONS),
                          "max_content_width": 100})
    click.version_option(__version__, *_VERSION_OPTIONS, prog_name="stratovirt",
                         message="%(prog)s (python microVM monitor) %(version)s")(command)
    return command


def parse_command_line(argv: list[str]) -> tuple[dict, bool] | int:
    """argv (without the program name) -> (values, print_config), or an exit status
    when --help or --version answered by itself."""
    args = _prepare(argv)
    if not any(arg in _HELP_OPTIONS or arg in _VERSION_OPTIONS for arg in args):
        values = _values(args)
        return values, bool(values.pop("print_config"))
    return _with_click(args)


def _values(args: list[str]) -> dict:
    """What click's command returns for well-formed args (_prepare's) without --help or
    --version: each value option's values as a tuple, each flag as a bool."""
    values: dict = {_dest(option): () for option in _VALUE_OPTIONS}
    values.update((_dest(flag), False) for flag in _FLAGS)
    i = 0
    while i < len(args):
        option = args[i]
        if option in _FLAGS:
            values[_dest(option)] = True
            i += 1
        else:
            values[_dest(option)] += (args[i + 1],)
            i += 2
    return values


def _with_click(args: list[str]) -> tuple[dict, bool] | int:
    import click
    try:
        result = command().main(args=args, prog_name="stratovirt", standalone_mode=False)
    except click.ClickException as error:
        raise ConfigError("command line", error.format_message(),
                          "see stratovirt --help") from None
    except click.exceptions.Abort:
        return 1
    if isinstance(result, int):
        return result
    return result, bool(result.pop("print_config"))


_KNOWN = (*_VALUE_OPTIONS, *_FLAGS, *_HELP_OPTIONS, *_VERSION_OPTIONS)


def _prepare(argv: list[str]) -> list[str]:
    """Join the unquoted -append words; catch options given without a value, unknown
    options and stray words, so click only ever sees well-formed input."""
    known = set(_KNOWN)
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token not in known:
            _refuse_word(token)
        out.append(token)
        if token not in _VALUE_OPTIONS:
            continue
        if token == "-append":
            words = []
            while i < len(argv) and argv[i] not in known:
                words.append(argv[i])
                i += 1
            if words:
                out.append(" ".join(words))
                continue
        elif i < len(argv) and argv[i] not in known:
            out.append(argv[i])
            i += 1
            continue
        meta, _ = _VALUE_OPTIONS[token]
        raise ConfigError(token, "needs a value", f"write {token} {meta}")
    return out


def _refuse_word(token: str):
    if token.startswith("-"):
        import difflib
        close = difflib.get_close_matches(token, _KNOWN, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(token, "unknown option",
                          f"{hint}the options are listed by stratovirt --help")
    raise ConfigError(show(token), "is not an option",
                      "options start with a single dash; only -append takes several words")


def draft_from_options(values: dict) -> Draft:
    """The parsed option values -> Draft, each value tagged with its option."""
    draft = Draft()
    for option in _VALUE_OPTIONS:
        given = values.get(_dest(option)) or ()
        for text in given:
            check_text(text, option)
        if option not in _REPEATABLE and len(given) > 1:
            raise ConfigError(option, f"given {len(given)} times", "give it once")
    scalars = draft.scalars

    def one(option: str, name: str, convert=lambda text, where: text):
        given = values.get(_dest(option))
        if given:
            scalars[name] = Setting(convert(given[0], option), option)

    one("-name", "name")
    one("-kernel", "kernel")
    one("-append", "boot_args")
    one("-initrd", "initrd")
    one("-smp", "vcpus", parse_smp)
    one("-m", "mem_size", _parse_memory)
    one("-api-channel", "api_channel", _parse_api_channel)
    one("-serial", "serial_stdio", parse_serial)
    one("-D", "log_file")
    one("-metrics", "metrics_file")
    one("-pidfile", "pidfile")
    for text in values.get("backend_restart") or ():
        item = _item("restart", "-backend-restart", text, _RESTART)
        scalars.update((name, item.fields[name]) for name in item.fields)
    for flag, name in (("-daemonize", "daemonize"), ("-disable-seccomp", "disable_seccomp"),
                       ("-omit_vm_memory", "omit_vm_memory")):
        if values.get(_dest(flag)):
            scalars[name] = Setting(True, flag)

    for index, text in enumerate(values.get("drive") or ()):
        draft.devices["drive"].append(_item("drive", f"-drive[{index}]", text, _DRIVE))
        ratelimit.throttling_setting(draft.devices["drive"][-1])
    for index, text in enumerate(values.get("netdev") or ()):
        draft.devices["nic"].append(_item("nic", f"-netdev[{index}]", text, _NETDEV))
        ratelimit.throttling_setting(draft.devices["nic"][-1])
    for index, text in enumerate(values.get("chardev") or ()):
        draft.devices["console"].append(_item("console", f"-chardev[{index}]", text, _CHARDEV))
    for index, text in enumerate(values.get("device") or ()):
        where = f"-device[{index}]"
        driver, _, rest = text.partition(",")
        if driver != "vsock":
            raise ConfigError(where, f"unknown device type {show(driver)}",
                              "the only -device type is vsock (disks are -drive, NICs "
                              "-netdev, the console -chardev)")
        draft.devices["vsock"].append(_item("vsock", where, rest, _VSOCK))
    return draft


# Property tables: cmdline key -> (internal field, converter, required).
_DRIVE = {"id": ("id", None, True), "file": ("path", None, True),
          "readonly": ("read_only", parse_bool, False), "direct": ("direct", parse_bool, False),
          "serial": ("serial", None, False),
          **{f"throttling.{name}": (f"throttling.{name}", None, False)
             for name in ratelimit.THROTTLING}}
_NETDEV = {"id": ("id", None, True), "netdev": ("tap", None, True), "mac": ("mac", None, False),
           **{f"throttling.{name}": (f"throttling.{name}", None, False)
              for name in ratelimit.NIC_THROTTLING}}
_CHARDEV = {"id": ("id", None, True), "path": ("socket", None, True)}
_VSOCK = {"id": ("id", None, True), "guest-cid": ("guest_cid", parse_int, True)}
_RESTART = {"restarts": ("backend_restarts", parse_int, True),
            "window": ("backend_restart_window", parse_int, False)}


def _item(kind: str, where: str, text: str, table: dict) -> Item:
    keys = ", ".join(table)
    item = Item(kind, where)
    for key, value in split_properties(text, where):
        if key not in table:
            raise ConfigError(f"{where}.{key}", "unknown property", f"the properties are {keys}")
        if value is None:
            raise ConfigError(f"{where}.{key}", "has no value", f"write {key}=VALUE")
        name, convert, _ = table[key]
        field_where = f"{where}.{key}"
        item.fields[name] = Setting(convert(value, field_where) if convert else value,
                                    field_where)
    for key, (name, _, required) in table.items():
        if required and name not in item.fields:
            raise ConfigError(f"{where}.{key}", "missing",
                              f"required: {', '.join(k for k, v in table.items() if v[2])}")
    return item


def _parse_memory(text: str, where: str) -> int:
    """The seed's -m: a plain number is bytes, where StratoVirt 2.x reads MiB; a plain
    number that is in range only as MiB gets that hint."""
    size = parse_size(text, where)
    low, high = L.MEM_SIZE
    if text.strip().isdigit() and size < low and low <= size * L.MiB <= high:
        raise memory_out_of_range(size, where, f" (a plain number is bytes: for {size} MiB "
                                               f"write {size}M)")
    return size


def _parse_api_channel(text: str, where: str) -> str:
    scheme, sep, path = text.partition(":")
    if scheme != "unix" or not sep or not path:
        raise ConfigError(where, f"{show(text)} is not a unix socket address",
                          "write unix:/path/to/socket")
    return path
