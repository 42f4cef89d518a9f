"""Draft -> MachineConfig: ranges, syntax of names, consistency, then the host's files.

Checks that need nothing but the values come first, so a typo is reported before a
missing file. The first problem found is the one reported.
"""

import re
import string

from ..boot.kernel import BadKernel, KernelImage, initrd_address, inspect, read_head
from .. import layout
from ..devices.virtio import discovery
from . import inherited
from . import limits as L
from . import paths
from .draft import Draft, Item, Setting
from .errors import ConfigError
from .model import (BackendRestart, BootSource, Console, Drive, MachineConfig, MachineSpec, Nic,
                    Rng, Vsock)
from .values import human_size, memory_out_of_range, show

_ID = re.compile(L.ID_PATTERN)
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_SERIAL_CHARS = set(string.printable) - set(string.whitespace) | {" "}


def build(draft: Draft) -> MachineConfig:
    s = draft.scalars
    _check_scalars(s)
    _check_devices(draft.devices)
    _check_combinations(s, draft.devices)
    return _with_host_checks(s, draft.devices)


def _value(s: dict[str, Setting], name: str, default):
    return s[name].value if name in s else default


def _require(s: dict[str, Setting], name: str, options: str, hint: str) -> Setting:
    if name not in s:
        raise ConfigError(options, "missing", hint)
    return s[name]


def _check_range(setting: Setting, low: int, high: int, what: str) -> None:
    if not low <= setting.value <= high:
        raise ConfigError(setting.where, f"{setting.value} {what} is out of range",
                          f"allowed {low}..{high}")


def _check_scalars(s: dict[str, Setting]) -> None:
    _require(s, "kernel", "-kernel", "give the kernel image with -kernel or "
             "boot-source.kernel_image_path")
    _require(s, "api_channel", "-api-channel",
             "give the control socket with -api-channel unix:/path/to/socket")
    if "name" in s:
        name = s["name"]
        low, high = L.NAME_CHARS
        if not low <= len(name.value) <= high:
            raise ConfigError(name.where, f"name of {len(name.value)} characters",
                              f"allowed {low}..{high} characters")
        if not name.value.isprintable():
            raise ConfigError(name.where, f"{show(name.value)} has characters that are not printable",
                              "use printable characters")
    if "vcpus" in s:
        _check_range(s["vcpus"], *L.VCPUS, "vCPUs")
    if "mem_size" in s:
        _check_memory(s["mem_size"])
    if "backend_restarts" in s:
        _check_range(s["backend_restarts"], *L.BACKEND_RESTARTS, "restarts")
    if "backend_restart_window" in s:
        _check_range(s["backend_restart_window"], *L.BACKEND_RESTART_WINDOW, "seconds")
    if "boot_args" in s:
        args = s["boot_args"]
        size = len(args.value.encode("utf-8", "surrogateescape"))
        if size > L.BOOT_ARGS_BYTES:
            raise ConfigError(args.where, f"kernel command line of {size} bytes",
                              f"at most {L.BOOT_ARGS_BYTES} bytes")


def _check_memory(mem: Setting) -> None:
    low, high = L.MEM_SIZE
    if not low <= mem.value <= high:
        raise memory_out_of_range(mem.value, mem.where)
    if mem.value % L.MEM_ALIGN:
        raise ConfigError(mem.where, f"{mem.value} bytes is not a multiple of 4 KiB",
                          f"round it to a multiple of {L.MEM_ALIGN} bytes")


_OTHERS = (f"x86_64 allows {L.MAX_OTHER_DEVICES} devices besides disks and NICs: "
           "one console and one vsock")
_COUNT_LIMITS = {
    # kind: (limit, noun, what the limit covers)
    "drive": (L.MAX_DRIVES, "disks", "hot-plugged ones included"),
    "nic": (L.MAX_NICS, "NICs", "hot-plugged ones included"),
    "console": (L.MAX_CONSOLES, "consoles", _OTHERS),
    "vsock": (L.MAX_VSOCKS, "vsock devices", _OTHERS),
    "rng": (L.MAX_RNGS, "rng devices", "one virtio-rng, besides the console and vsock"),
}


def _check_devices(devices: dict[str, list[Item]]) -> None:
    for kind, (limit, noun, scope) in _COUNT_LIMITS.items():
        items = devices[kind]
        if len(items) > limit:
            raise ConfigError(items[limit].where, f"{len(items)} {noun} given",
                              f"at most {limit} ({scope})")
    seen: dict[str, Item] = {}
    for item in (i for items in devices.values() for i in items):
        ident = item.fields["id"]
        _check_id(ident)
        if ident.value in seen:
            raise ConfigError(ident.where, f"id {show(ident.value)} is also used by "
                              f"{seen[ident.value].where}", "ids must be unique across devices")
        seen[ident.value] = item
    for item in devices["drive"]:
        if "serial" in item.fields:
            _check_serial(item.fields["serial"])
    for item in devices["nic"]:
        if "tap" in item.fields:
            _check_tap(item.fields["tap"])
        if "mac" in item.fields:
            _check_mac(item.fields["mac"])
    for item in devices["vsock"]:
        _check_range(item.fields["guest_cid"], *L.GUEST_CID, "as guest CID")
    for item in devices["rng"]:
        _check_rng_rate(item)
    _check_distinct([i for i in devices["nic"] if "tap" in i.fields], "tap", "tap")
    _check_distinct([i for i in devices["nic"] if "tap_fd" in i.fields], "tap_fd",
                    "file descriptor")


def _nic(item: Item) -> Nic:
    f = item.fields
    fd = f["tap_fd"].value if "tap_fd" in f else None
    return Nic(item.id, inherited.tap(f["tap_fd"]) if fd is not None else f["tap"].value,
               f["mac"].value.lower() if "mac" in f else None,
               *(f[f"{d}_rate_limit"].value if f"{d}_rate_limit" in f else None
                 for d in ("rx", "tx")), fd=fd)


def _check_rng_rate(item: Item) -> None:
    f = item.fields
    if "max_bytes" in f:
        _check_range(f["max_bytes"], *L.RNG_MAX_BYTES, "bytes")
    if "period" in f:
        _check_range(f["period"], *L.RNG_PERIOD_MS, "ms")
    max_bytes = f["max_bytes"].value if "max_bytes" in f else L.DEFAULT_RNG_MAX_BYTES
    period = f["period"].value if "period" in f else L.DEFAULT_RNG_PERIOD_MS
    rate = max_bytes * 1000 // period
    low, high = L.RNG_RATE
    if not low <= rate <= high:
        where = f["max_bytes"].where if "max_bytes" in f else f["period"].where
        raise ConfigError(where, f"{max_bytes} bytes per {period} ms is {rate} bytes/s",
                          f"allowed {low}..{high} bytes/s (max-bytes * 1000 / period)")


def _rng(item: Item) -> Rng:
    f = item.fields
    return Rng(item.id, paths.entropy_source(f["source"]),
               f["max_bytes"].value if "max_bytes" in f else L.DEFAULT_RNG_MAX_BYTES,
               f["period"].value if "period" in f else L.DEFAULT_RNG_PERIOD_MS)


def _vsock(item: Item, api_channel: Setting, others: list) -> Vsock:
    """The userspace vsock, with its host socket beside the api-channel; or the kernel's
    vhost-vsock (2.x), on the caller's fd when it passed one."""
    f = item.fields
    if "vhost" in f and f["vhost"].value:
        fd = inherited.vhost_vsock(f["vhost_fd"]) if "vhost_fd" in f else None
        return Vsock(item.id, f["guest_cid"].value, None, vhost=True, fd=fd)
    vsock = Vsock(item.id, f["guest_cid"].value, paths.vsock_socket(f["id"], api_channel))
    if vsock.socket in others:
        raise ConfigError(f["id"].where, f"the vsock socket {show(str(vsock.socket))} is also "
                          "the path of another file it creates", "choose another vsock id")
    return vsock


def _check_id(ident: Setting) -> None:
    low, high = L.ID_CHARS
    if not (low <= len(ident.value) <= high and _ID.fullmatch(ident.value)):
        raise ConfigError(ident.where, f"{show(ident.value)} is not a valid id",
                          f"{low}..{high} characters: a letter, then letters, digits, "
                          "'-', '.', '_'")


def _check_serial(serial: Setting) -> None:
    low, high = L.DRIVE_SERIAL_BYTES
    if not (low <= len(serial.value) <= high and set(serial.value) <= _SERIAL_CHARS):
        raise ConfigError(serial.where, f"{show(serial.value)} is not a valid disk serial",
                          f"{low}..{high} printable ASCII characters")


def _check_tap(tap: Setting) -> None:
    # The kernel's dev_valid_name(): length, no '/', ':' or whitespace, not . or ..
    name = tap.value
    size = len(name.encode("utf-8", "surrogateescape"))
    low, high = L.TAP_NAME_BYTES
    if (not low <= size <= high or name in (".", "..")
            or any(c in "/:" or c.isspace() for c in name)):
        raise ConfigError(tap.where, f"{show(name)} is not a valid interface name",
                          f"{low}..{high} bytes, no '/', ':' or whitespace, not '.' or '..'")


def _check_mac(mac: Setting) -> None:
    if not _MAC.fullmatch(mac.value):
        raise ConfigError(mac.where, f"{show(mac.value)} is not a MAC address",
                          "six hex pairs separated by ':', like 0e:90:df:9f:a8:88")
    first = int(mac.value[:2], 16)
    if first & 1:
        raise ConfigError(mac.where, f"{mac.value} is a multicast address",
                          "give a unicast MAC (lowest bit of the first byte clear)")
    if int(mac.value.replace(":", ""), 16) == 0:
        raise ConfigError(mac.where, "00:00:00:00:00:00 is not a usable MAC",
                          "give a unicast MAC other than all zeros")


def _check_distinct(items: list[Item], name: str, what: str) -> None:
    seen: dict[str, Setting] = {}
    for item in items:
        setting = item.fields[name]
        if setting.value in seen:
            raise ConfigError(setting.where, f"{what} {show(setting.value)} is also used by "
                              f"{seen[setting.value].where}", f"give each device its own {what}")
        seen[setting.value] = setting


def _check_combinations(s: dict[str, Setting], devices: dict[str, list[Item]]) -> None:
    daemonize = _value(s, "daemonize", False)
    if "pidfile" in s and not daemonize:
        raise ConfigError(s["pidfile"].where, "only works with -daemonize",
                          "add -daemonize or drop -pidfile")
    if daemonize and _value(s, "log_stdout", False):
        raise ConfigError(s["log_stdout"].where, "-D without a file logs to stdout, which a "
                          "daemon does not have", "give -D PATH or drop -daemonize")
    if daemonize and _value(s, "serial_stdio", False):
        raise ConfigError(s["serial_stdio"].where, "a daemon has no stdio for the serial port",
                          "drop -serial stdio or -daemonize")
    created = [s[name] for name in ("api_channel", "pidfile", "log_file", "metrics_file")
               if name in s]
    created += [item.fields["socket"] for item in devices["console"]]
    seen: dict = {}
    for setting in created:
        path = paths.absolute(setting)
        if path in seen:
            raise ConfigError(setting.where, f"{show(str(path))} is also {seen[path].where}",
                              "give each socket, pidfile, log and metrics file its own path")
        seen[path] = setting


def _kernel_image(kernel: Setting) -> KernelImage:
    path = paths.absolute(kernel)
    try:
        return inspect(*read_head(path))
    except BadKernel as error:
        raise ConfigError(kernel.where, f"kernel {show(str(path))} {error}",
                          "give an ELF vmlinux (x86_64) or a bzImage (boot protocol 2.06+)"
                          ) from None


def _with_host_checks(s: dict[str, Setting], devices: dict[str, list[Item]]) -> MachineConfig:
    kernel = s["kernel"]
    paths.existing_file(kernel, "kernel")
    image = _kernel_image(kernel)
    boot_args = _value(s, "boot_args", "")
    slots = discovery.slot_count(bool(devices["console"]), bool(devices["vsock"]),
                                 bool(devices["rng"]))
    cmdline = discovery.kernel_cmdline(boot_args, slots)
    if len(cmdline.encode("utf-8", "surrogateescape")) >= image.cmdline_size:
        room = image.cmdline_size - 2 - len(discovery.cmdline_devices(slots))
        raise ConfigError(s["boot_args"].where, "kernel command line too long for this kernel",
                          f"it takes at most {room} bytes besides the virtio-mmio slots' words")
    if "initrd" in s:
        initrd = s["initrd"]
        size = paths.existing_file(initrd, "initrd").st_size
        mem_size = _value(s, "mem_size", L.DEFAULT_MEM_SIZE)
        try:
            initrd_address(image, mem_size, size)
        except BadKernel as error:
            raise ConfigError(initrd.where, f"an initrd of {human_size(size)} does not fit in "
                              f"{human_size(mem_size)} of memory: the kernel {error}",
                              "give more memory (-m) or a smaller initrd") from None

    drives, opened = [], {}
    for item in devices["drive"]:
        f = item.fields
        read_only = f["read_only"].value if "read_only" in f else L.DEFAULT_READ_ONLY
        direct = f["direct"].value if "direct" in f else L.DEFAULT_DIRECT
        info = paths.existing_file(f["path"], "disk image", writable=not read_only,
                                   block_ok=True)
        if direct:
            paths.supports_direct_io(f["path"])
        key = (info.st_dev, info.st_ino)
        if key in opened and not (read_only and opened[key][1]):
            raise ConfigError(f["path"].where, f"the same file as {opened[key][0]}",
                              "a disk image may be shared only when every user is read-only")
        opened[key] = (f["path"].where, read_only)
        drives.append(Drive(item.id, paths.absolute(f["path"]), read_only, direct,
                            f["serial"].value if "serial" in f else None,
                            layout.disk_queues(_value(s, "vcpus", L.DEFAULT_VCPUS)),
                            f["rate_limit"].value if "rate_limit" in f else None))

    console = None
    for item in devices["console"]:
        console = Console(item.id, paths.new_path(item.fields["socket"], "console socket",
                                                   socket=True))
    api_channel = paths.new_path(s["api_channel"], "api-channel socket", socket=True)
    pidfile = paths.new_path(s["pidfile"], "pidfile") if "pidfile" in s else None
    log_file = paths.log_path(s["log_file"]) if "log_file" in s else None
    others = [p for p in (api_channel, console and console.socket, pidfile, log_file) if p]
    vsock = next((_vsock(item, s["api_channel"], others) for item in devices["vsock"]), None)

    return MachineConfig(
        boot=BootSource(paths.absolute(kernel), boot_args,
                        paths.absolute(s["initrd"]) if "initrd" in s else None),
        machine=MachineSpec(_value(s, "name", L.DEFAULT_NAME),
                            _value(s, "vcpus", L.DEFAULT_VCPUS),
                            _value(s, "mem_size", L.DEFAULT_MEM_SIZE),
                            _value(s, "omit_vm_memory", False)),
        drives=tuple(drives),
        nics=tuple(_nic(item) for item in devices["nic"]),
        console=console,
        vsock=vsock,
        serial_stdio=_value(s, "serial_stdio", False),
        api_channel=api_channel,
        log_file=log_file,
        pidfile=pidfile,
        daemonize=_value(s, "daemonize", False),
        seccomp=not _value(s, "disable_seccomp", False),
        backend_restart=BackendRestart(
            _value(s, "backend_restarts", L.DEFAULT_BACKEND_RESTARTS),
            _value(s, "backend_restart_window", L.DEFAULT_BACKEND_RESTART_WINDOW)),
        metrics_file=paths.metrics_path(s["metrics_file"]) if "metrics_file" in s else None,
        rng=next((_rng(item) for item in devices["rng"]), None),
        log_stdout=_value(s, "log_stdout", False),
    )
