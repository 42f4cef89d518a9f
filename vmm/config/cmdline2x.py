"""StratoVirt 2.x's command line, as Kata Containers writes it -> the Draft the seed's
reader makes, so the limits, checks and -print-config are the seed's.

What differs from the seed (docs/configuration.md, "StratoVirt 2.x's command line"):
-m reads a plain number as MiB; -append takes one word; the control socket is
-qmp unix:PATH,server,nowait; -D may come without a file; a disk, NIC or console is a
-device naming its driver and, by id, its backend (-drive, -netdev, -chardev). Each
device of the MachineConfig takes its -device's id, the name QMP's device_del uses.
Only called for a line form.marker_2x recognised.
"""

from . import inherited
from . import limits as L
from . import ratelimit
from .cmdline import parse_command_line
from .draft import Draft, Item, Setting
from .errors import ConfigError
from .form import SEED_ONLY
from .values import (check_text, memory_out_of_range, parse_bool, parse_int, parse_serial,
                     parse_size, parse_smp, show, split_properties)

_VALUE_OPTIONS = {
    # option: how its value is written, for "needs a value"
    "-name": "NAME", "-uuid": "UUID", "-smp": "N", "-m": "MiB", "-kernel": "PATH",
    "-append": '"KERNEL ARGS"', "-initrd": "PATH", "-qmp": "unix:PATH,server,nowait",
    "-machine": "type=microvm[,dump-guest-core=on|off][,mem-share=on]",
    "-serial": "stdio", "-pidfile": "PATH",
    "-object": "rng-random,id=ID,filename=PATH", "-device": "DRIVER,id=ID,...",
    "-drive": "id=ID,file=PATH[,readonly=on|off][,direct=on|off][,throttling.iops-total=N]",
    "-netdev": "tap,id=ID,ifname=TAP", "-chardev": "socket,id=ID,path=PATH,server,nowait",
}
_REPEATABLE = ("-object", "-device", "-drive", "-netdev", "-chardev")
_FLAGS = {"-disable-seccomp": "disable_seccomp", "-daemonize": "daemonize",
          "-print-config": None}
_LOG = "-D"        # with a file, or alone (the log on stdout, as Kata reads it: vmm/log.py)
_HELP = ("-h", "-help", "--help", "-version", "--version")

_FLAG = object()   # a property written as a bare word (server, nowait)
# Property tables: property -> (required, converter: None for text, _FLAG, or a parser).
_DEVICES = {
    "virtio-blk-device": {"id": (True, None), "drive": (True, None), "serial": (False, None)},
    "virtio-net-device": {"id": (True, None), "netdev": (True, None), "mac": (False, None)},
    "virtio-serial-device": {"id": (True, None)},
    "virtconsole": {"id": (True, None), "chardev": (True, None), "nr": (False, parse_int)},
    "virtio-rng-device": {"id": (True, None), "rng": (True, None),
                          "max-bytes": (False, parse_int), "period": (False, parse_int)},
    "vhost-vsock-device": {"id": (True, None), "guest-cid": (True, parse_int),
                           "vhostfd": (False, parse_int)},
}
# Backend options: (type word first, or None; properties).
_BACKENDS = {
    "-drive": (None, {"id": (True, None), "file": (True, None),
                      "readonly": (False, parse_bool), "direct": (False, parse_bool),
                      **{f"throttling.{name}": (False, None) for name in ratelimit.THROTTLING}}),
    "-netdev": ("tap", {"id": (True, None), "ifname": (False, None), "fds": (False, None),
                        **{f"throttling.{name}": (False, None)
                           for name in ratelimit.NIC_THROTTLING}}),
    "-chardev": ("socket", {"id": (True, None), "path": (True, None),
                            "server": (True, _FLAG), "nowait": (True, _FLAG)}),
    "-object": ("rng-random", {"id": (True, None), "filename": (True, None)}),
}
# driver -> (its property naming a backend, that backend's option)
_LINKS = {"virtio-blk-device": ("drive", "-drive"), "virtio-net-device": ("netdev", "-netdev"),
          "virtconsole": ("chardev", "-chardev"), "virtio-rng-device": ("rng", "-object")}


def read(argv: list[str], marker: str) -> tuple[Draft, bool] | int:
    """argv of a 2.x line -> (Draft, print_config), or the exit status of --help or
    --version (the one help, the seed's, which points here)."""
    for token in argv:
        if token in _HELP:
            return parse_command_line([token])
    given = _split(argv, marker)
    draft = _scalars(given)
    _devices(given, marker, draft)
    return draft, bool(given["-print-config"])


def _split(argv: list[str], marker: str) -> dict[str, list]:
    """Each option's values in order (None for a flag, and for -D alone)."""
    given: dict[str, list] = {option: [] for option in (*_VALUE_OPTIONS, *_FLAGS, _LOG)}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in SEED_ONLY:
            _mixed(token, token, marker)
        if token not in given:
            _refuse_word(token)
        value = argv[i] if i < len(argv) else None
        if token in _FLAGS or (token == _LOG and (value is None or value.startswith("-"))):
            given[token].append(None)
            continue
        if token != _LOG and (value is None or value in given or value in SEED_ONLY):
            raise ConfigError(token, "needs a value", f"write {token} {_VALUE_OPTIONS[token]}")
        check_text(value, token)
        given[token].append(value)
        i += 1
    for option, values in given.items():
        if option not in _REPEATABLE and len(values) > 1:
            raise ConfigError(option, f"given {len(values)} times", "give it once")
    return given


def _refuse_word(token: str):
    if token.startswith("-"):
        import difflib
        close = difflib.get_close_matches(token, [*_VALUE_OPTIONS, *_FLAGS, _LOG], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(token, "unknown option in a StratoVirt 2.x command line",
                          f"{hint}see docs/configuration.md")
    raise ConfigError(show(token), "is not an option",
                      'in the 2.x form every option takes one word: quote -append "..."')


def _mixed(where: str, seed: str, marker: str):
    raise ConfigError(where, f"{seed} is the seed form's, but {marker} is StratoVirt 2.x's",
                      f"write the whole line in one form (in 2.x: {SEED_ONLY[seed]})")


def _scalars(given: dict[str, list]) -> Draft:
    draft = Draft()
    s = draft.scalars

    def one(option: str, name: str, convert=None):
        if given[option]:
            text = given[option][0]
            s[name] = Setting(convert(text, option) if convert else text, option)

    one("-name", "name")
    one("-kernel", "kernel")
    one("-append", "boot_args")
    one("-initrd", "initrd")
    one("-smp", "vcpus", parse_smp)
    one("-m", "mem_size", _parse_memory)
    one("-qmp", "api_channel", _parse_qmp)
    one("-serial", "serial_stdio", parse_serial)
    one("-pidfile", "pidfile")
    if given[_LOG] and given[_LOG][0] is not None:
        s["log_file"] = Setting(given[_LOG][0], _LOG)
    elif given[_LOG]:
        s["log_stdout"] = Setting(True, _LOG)
    for flag, name in _FLAGS.items():
        if name and given[flag]:
            s[name] = Setting(True, flag)
    if given["-uuid"]:
        _check_uuid(given["-uuid"][0])
    if given["-machine"]:
        s.update(_machine(given["-machine"][0]))
    if "api_channel" not in s:
        raise ConfigError("-qmp", "missing", "give the control socket with "
                          "-qmp unix:/path/to/socket,server,nowait")
    return draft


def _parse_memory(text: str, where: str) -> int:
    """2.x's -m: a plain number is MiB (the seed's is bytes); suffixes as in the seed.
    A plain number that is in range only as bytes gets that hint."""
    plain = text.strip()
    if not (plain.isascii() and plain.isdigit()):
        return parse_size(text, where)
    size = int(plain) * L.MiB
    low, high = L.MEM_SIZE
    if size > high and low <= int(plain) <= high and int(plain) % L.MiB == 0:
        raise memory_out_of_range(size, where, f" (a plain number is MiB here: for "
                                               f"{plain} bytes write {int(plain) // L.MiB})")
    return size


def _parse_qmp(text: str, where: str) -> str:
    (address, _), *flags = split_properties(text, where)
    scheme, _, path = address.partition(":")
    if scheme == "tcp":
        raise ConfigError(where, "a TCP QMP socket is not supported",
                          "write -qmp unix:/path/to/socket,server,nowait")
    if scheme != "unix" or not path:
        raise ConfigError(where, f"{show(address)} is not a unix socket address",
                          "write -qmp unix:/path/to/socket,server,nowait")
    if sorted(flags) != [("nowait", None), ("server", None)]:
        raise ConfigError(where, "needs server,nowait and nothing else",
                          "the VMM listens on the socket and does not wait for a client: "
                          "write -qmp unix:/path/to/socket,server,nowait")
    return path


def _check_uuid(text: str) -> None:
    """Read and checked, then dropped: a microVM has no firmware table to carry it
    (StratoVirt's microVM ignores it too)."""
    parts = text.split("-")
    if [len(p) for p in parts] != [8, 4, 4, 4, 12] or not all(
            c in "0123456789abcdefABCDEF" for p in parts for c in p):
        raise ConfigError("-uuid", f"{show(text)} is not a UUID",
                          "write 8-4-4-4-12 hex digits, like 0e90df9f-a888-4f3b-9a2c-1234567890ab")


def _machine(text: str) -> dict[str, Setting]:
    """-machine type=microvm[,dump-guest-core=on|off][,mem-share=on] -> omit_vm_memory."""
    pairs = split_properties(text, "-machine")
    if pairs[0][1] is None:                   # -machine microvm,...
        pairs[0] = ("type", pairs[0][0])
    settings, seen = {}, set()
    for key, value in pairs:
        where = f"-machine.{key}"
        if key not in ("type", "dump-guest-core", "mem-share") or key in seen:
            raise ConfigError(where, "unknown or repeated property",
                              "the properties are type, dump-guest-core, mem-share")
        seen.add(key)
        if value is None:
            raise ConfigError(where, "has no value", f"write {key}=VALUE")
        if key == "type" and value != "microvm":
            raise ConfigError(where, f"{show(value)} is not supported",
                              "the only machine type is microvm")
        if key == "dump-guest-core":
            settings["omit_vm_memory"] = Setting(not parse_bool(value, where), where)
        if key == "mem-share" and not parse_bool(value, where):
            raise ConfigError(where, "off is not supported", "guest memory is always shared "
                              "with the device backends (vhost-user): write on or drop it")
    if "type" not in seen:
        raise ConfigError("-machine.type", "missing", "write -machine type=microvm,...")
    return settings


def _properties(where: str, pairs, table: dict) -> dict[str, Setting]:
    props = {}
    for key, value in pairs:
        field = f"{where}.{key}"
        if key not in table:
            raise ConfigError(field, "unknown property", f"the properties are {', '.join(table)}")
        _, convert = table[key]
        if convert is _FLAG:
            if value is not None:
                raise ConfigError(field, "takes no value", f"write {key} alone")
        elif value is None:
            raise ConfigError(field, "has no value", f"write {key}=VALUE")
        props[key] = Setting(value if convert in (None, _FLAG) else convert(value, field), field)
    for key, (required, _) in table.items():
        if required and key not in props:
            raise ConfigError(f"{where}.{key}", "missing",
                              f"required: {', '.join(k for k, v in table.items() if v[0])}")
    return props


def _first_word(where: str, text: str):
    """Split `word,key=value,...`: (word, the other pairs); the word is None when the
    value starts with a property (the seed's syntax)."""
    pairs = split_properties(text, where)
    if pairs[0][1] is not None:
        return None, pairs
    return pairs[0][0], pairs[1:]


def _backend(option: str, where: str, text: str, marker: str) -> dict[str, Setting]:
    kind, table = _BACKENDS[option]
    if kind is None:
        return _properties(where, split_properties(text, where), table)
    word, pairs = _first_word(where, text)
    if word is None and option in ("-netdev", "-chardev"):
        _mixed(where, f"{option} id=", marker)
    if word != kind:
        raise ConfigError(where, f"{show(word or text)} is not supported",
                          f"the only {option} type is {kind}: write {option} "
                          f"{_VALUE_OPTIONS[option]}")
    props = _properties(where, pairs, table)
    if option == "-netdev":
        if ("ifname" in props) == ("fds" in props):
            raise ConfigError(where, "needs ifname=TAP or fds=FD:FD..., one of them",
                              "write -netdev tap,id=ID,ifname=TAP")
        if "fds" in props:
            props["fds"] = Setting(inherited.parse_fds(props["fds"]), props["fds"].where)
    return props


def _device(where: str, text: str, marker: str) -> tuple[str, dict[str, Setting]]:
    driver, pairs = _first_word(where, text)
    if driver == "vsock":
        _mixed(where, "-device vsock", marker)
    if driver not in _DEVICES:
        raise ConfigError(where, f"unknown driver {show(driver or text)}",
                          f"the drivers are {', '.join(_DEVICES)}")
    return driver, _properties(where, pairs, _DEVICES[driver])


def _devices(given: dict[str, list], marker: str, draft: Draft) -> None:
    """Every -device with its backend -> the Draft's disks, NICs, console and rng, in the
    order of the -device options (the slot order)."""
    backends = _backends(given, marker)
    devices = _device_list(given, marker)
    _check_links(devices, backends)
    _check_serial_bus(devices)
    kinds = {"virtio-blk-device": "drive", "virtio-net-device": "nic", "virtconsole": "console",
             "virtio-rng-device": "rng", "vhost-vsock-device": "vsock"}
    for where, driver, props in devices:
        if driver not in kinds:
            continue
        key, option = _LINKS.get(driver, (None, None))
        backend = backends[option][props[key].value][1] if option else {}
        item = Item(kinds[driver], where, {"id": props["id"]})
        fields = {      # internal field: the property of the device or its backend
            "drive": {"path": backend.get("file"), "read_only": backend.get("readonly"),
                      "direct": backend.get("direct"), "serial": props.get("serial")},
            "nic": {"tap": backend.get("ifname"), "tap_fd": backend.get("fds"),
                    "mac": props.get("mac")},
            "console": {"socket": backend.get("path")},
            "rng": {"source": backend.get("filename"), "max_bytes": props.get("max-bytes"),
                    "period": props.get("period")},
            "vsock": {"guest_cid": props.get("guest-cid"), "vhost": Setting(True, where),
                      "vhost_fd": props.get("vhostfd")},
        }[item.kind]
        if item.kind in ("drive", "nic"):
            fields.update((name, setting) for name, setting in backend.items()
                          if name.startswith("throttling."))
        item.fields.update((name, setting) for name, setting in fields.items() if setting)
        if item.kind in ("drive", "nic"):
            ratelimit.throttling_setting(item)
        draft.devices[item.kind].append(item)


def _backends(given: dict[str, list], marker: str) -> dict[str, dict[str, tuple[str, dict]]]:
    """option -> id -> (where, properties); ids are unique per option, as in 2.x."""
    backends: dict[str, dict[str, tuple[str, dict]]] = {option: {} for option in _BACKENDS}
    for option in _BACKENDS:
        for index, text in enumerate(given[option]):
            where = f"{option}[{index}]"
            props = _backend(option, where, text, marker)
            ident = props["id"]
            if ident.value in backends[option]:
                raise ConfigError(ident.where, f"id {show(ident.value)} is also used by "
                                  f"{backends[option][ident.value][0]}",
                                  f"give each {option} its own id")
            backends[option][ident.value] = (where, props)
    return backends


def _device_list(given: dict[str, list], marker: str) -> list[tuple[str, str, dict]]:
    """[(where, driver, properties)]; ids unique across every -device, also those that
    have no place in the Draft (the serial bus)."""
    devices, ids = [], {}
    for index, text in enumerate(given["-device"]):
        where = f"-device[{index}]"
        driver, props = _device(where, text, marker)
        ident = props["id"]
        if ident.value in ids:
            raise ConfigError(ident.where, f"id {show(ident.value)} is also used by "
                              f"{ids[ident.value]}", "ids must be unique across devices")
        ids[ident.value] = where
        devices.append((where, driver, props))
    return devices


def _check_links(devices: list, backends: dict) -> None:
    """Each device names a backend that exists, and each backend serves one device."""
    used: dict[tuple[str, str], str] = {}
    for where, driver, props in devices:
        if driver in _LINKS:
            key, option = _LINKS[driver]
            ref = props[key]
            if ref.value not in backends[option]:
                example = _VALUE_OPTIONS[option].replace("id=ID", f"id={ref.value}")
                raise ConfigError(ref.where, f"no {option} has id {show(ref.value)}",
                                  f"add {option} {example}")
            if (option, ref.value) in used:
                raise ConfigError(ref.where, f"{option} {show(ref.value)} is also used by "
                                  f"{used[option, ref.value]}",
                                  f"give each device its own {option}")
            used[option, ref.value] = where
    for driver, (key, option) in _LINKS.items():
        for ident, (where, _) in backends[option].items():
            if (option, ident) not in used:
                raise ConfigError(where, f"no -device uses {option} {show(ident)}",
                                  f"add -device {driver},{key}={ident},id=ID or drop it")


def _check_serial_bus(devices: list) -> None:
    """virtio-serial-device and virtconsole together are the one virtio-console: the
    first is 2.x's bus, the second its port 0."""
    serials = [where for where, driver, _ in devices if driver == "virtio-serial-device"]
    consoles = [(where, props) for where, driver, props in devices if driver == "virtconsole"]
    if consoles and not serials:
        raise ConfigError(consoles[0][0], "virtconsole needs a -device virtio-serial-device",
                          "add -device virtio-serial-device,id=ID")
    if serials and not consoles:
        raise ConfigError(serials[0], "virtio-serial-device without a virtconsole",
                          "add -device virtconsole,chardev=ID,id=ID,nr=0 (it is the "
                          "console's bus here) or drop it")
    if len(serials) > 1:
        raise ConfigError(serials[1], f"{len(serials)} virtio-serial-devices given",
                          "at most 1: it carries the one console")
    for _, props in consoles:
        if "nr" in props and props["nr"].value != 0:
            raise ConfigError(props["nr"].where, f"port {props['nr'].value} is not supported",
                              "the console is port 0: write nr=0")
