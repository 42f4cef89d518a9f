"""The QMP command table: every command, its arguments (vmm/qmp/schema.py types) and its
handler, in one place. The server checks a command's arguments against its entry before
the handler runs; a handler gets the checked arguments and the Context, and returns the
`return` value or raises QmpError.

Shapes are QEMU's and StratoVirt's (../shared/docs/spec.md "QMP", references.md), with
the arguments Kata Containers' client sends accepted as well (blockdev-add's `driver`,
`file.aio`, `cache.no-flush`; device_add's `drive`, `bus`, `romfile`, `share-rw`,
`num-queues`, block sizes).
"""

from dataclasses import dataclass
from typing import Callable

from .. import __version__, metrics    # before the vm process is confined: no lazy imports
from ..config import limits
from .errors import QmpError
from .schema import Bool, Enum, Int, List, Object, OnOff, Pattern, Str, opt, req

# The greeting's and query-version's QEMU version: clients (Kata's among them) refuse a
# QEMU older than 5.0, and StratoVirt answers 5.0.1 for that reason.
QEMU_VERSION = {"major": 5, "minor": 0, "micro": 1}
PACKAGE = f"stratovirt-py {__version__}"

EVENTS = ("SHUTDOWN", "RESET", "STOP", "RESUME", "POWERDOWN", "DEVICE_DELETED",
          "BACKEND_RESTARTED", "BACKEND_FAILED")
# Device, node and netdev ids as the configuration's (they become process names, log
# words, QOM paths): a letter, then letters, digits, '-', '.', '_'.
ID = Pattern(limits.ID_PATTERN, *limits.ID_CHARS,
             f"an id: {limits.ID_CHARS[0]}..{limits.ID_CHARS[1]} characters, a letter first, "
             "then letters, digits, '-', '.', '_'")


@dataclass
class Context:
    """What handlers work with: the machine, hot-plug (vmm/hotplug.py), and the file
    descriptors the client passed with SCM_RIGHTS (oldest first)."""
    machine: object
    hotplug: object
    take_fd: Callable[[], int | None]


@dataclass(frozen=True)
class Command:
    name: str
    args: Object
    handler: Callable[[Context, dict], object]
    doc: str
    then: Callable[[Context], None] | None = None    # after the reply is queued


def _nothing(ctx, args):
    return {}


def _query_status(ctx, args):
    machine = ctx.machine
    status = "running" if machine.running else "paused"
    return {"running": machine.running, "singlestep": False, "status": status}


def _stop(ctx, args):
    ctx.machine.pause()
    return {}


def _cont(ctx, args):
    ctx.machine.resume()
    return {}


def _query_cpus(ctx, args):
    return [{"CPU": t.vcpu.index, "current": t.vcpu.index == 0, "halted": False,
             "qom_path": f"/machine/unattached/device[{t.vcpu.index}]", "arch": "x86",
             "thread_id": t.native_id or 0} for t in ctx.machine.vcpus]


def _query_hotpluggable_cpus(ctx, args):
    return [{"type": "host-x86-cpu", "vcpus-count": 1,
             "props": {"socket-id": 0, "core-id": t.vcpu.index, "thread-id": 0},
             "qom-path": f"/machine/unattached/device[{t.vcpu.index}]"}
            for t in ctx.machine.vcpus]


def _query_version(ctx, args):
    return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}


def _query_commands(ctx, args):
    return [{"name": command.name} for command in TABLE]


def _query_events(ctx, args):
    return [{"name": name} for name in EVENTS]


def _system_powerdown(ctx, args):
    ctx.machine.press_power_button()
    ctx.machine.emit("POWERDOWN", {})
    return {}


def _getfd(ctx, args):
    fd = ctx.take_fd()
    if fd is None:
        raise QmpError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
    ctx.hotplug.getfd(args["fdname"], fd)
    return {}


def _closefd(ctx, args):
    ctx.hotplug.closefd(args["fdname"])
    return {}


def _blockdev_add(ctx, args):
    ctx.hotplug.blockdev_add(args)
    return {}


def _blockdev_del(ctx, args):
    ctx.hotplug.blockdev_del(args["node-name"])
    return {}


def _netdev_add(ctx, args):
    ctx.hotplug.netdev_add(args)
    return {}


def _netdev_del(ctx, args):
    ctx.hotplug.netdev_del(args["id"])
    return {}


def _device_add(ctx, args):
    ctx.hotplug.device_add(args)
    return {}


def _device_del(ctx, args):
    ctx.hotplug.device_del(args["id"])
    return {}


def _query_block(ctx, args):
    return ctx.hotplug.query_block()


def _query_blockstats(ctx, args):
    return metrics.blockstats(ctx.hotplug)


def _query_stats(ctx, args):
    return metrics.stats(ctx.hotplug, ctx.machine, args["target"], args.get("providers"),
                         args.get("vcpus"))


def _block_set_io_throttle(ctx, args):
    ctx.hotplug.set_io_throttle(args)
    return {}


def _set_nic_io_throttle(ctx, args):
    ctx.hotplug.set_nic_io_throttle(args)
    return {}


def _shut_down(reason: str) -> Callable[[Context], None]:
    def then(ctx):
        ctx.machine.shutdown(reason, guest=False)
    return then


def _reset(ctx):
    ctx.machine.reset(reason="host-qmp-system-reset", guest=False)


FDNAME = Str(max_length=64)
NONE = Object({})
FILE = Object({
    "driver": req(Enum(("file", "host_device"))),
    "filename": req(Str()),
    "aio": opt(Enum(("threads", "native", "io_uring"))),
})
CACHE = Object({"direct": opt(Bool()), "no-flush": opt(Bool())})
# block_set_io_throttle's numbers (QEMU's BlockIOThrottle): 0 is no limit.
LIMIT = Int(0, (1 << 63) - 1)
MAX_LENGTH = Int(0, 3600)
THROTTLE = Object({
    "device": opt(ID), "id": opt(ID),
    **{name: req(LIMIT) for name in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")},
    **{f"{name}_max": opt(LIMIT) for name in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd",
                                              "iops_wr")},
    **{f"{name}_max_length": opt(MAX_LENGTH) for name in ("bps", "bps_rd", "bps_wr", "iops",
                                                          "iops_rd", "iops_wr")},
    "iops_size": opt(LIMIT), "group": opt(Str(max_length=128)),
})
NIC_THROTTLE = Object({
    "id": req(ID),
    **{f"{d}_{name}": req(LIMIT) for d in ("rx", "tx") for name in ("bps", "pps")},
    **{f"{d}_{name}_max": opt(LIMIT) for d in ("rx", "tx") for name in ("bps", "pps")},
    **{f"{d}_{name}_max_length": opt(MAX_LENGTH) for d in ("rx", "tx") for name in ("bps", "pps")},
})

TABLE: tuple[Command, ...] = (
    Command("qmp_capabilities", Object({"enable": opt(List(Enum(()), max_items=8))}), _nothing,
            "End capabilities negotiation (no capabilities are offered)."),
    Command("quit", NONE, _nothing, "End the VM (SHUTDOWN host-qmp-quit) after the reply.",
            then=_shut_down("host-qmp-quit")),
    Command("stop", NONE, _stop, "Pause every vCPU (STOP)."),
    Command("cont", NONE, _cont, "Resume the vCPUs (RESUME)."),
    Command("system_reset", NONE, _nothing,
            "Reset the machine: as the guest's own reset, this microVM ends (RESET, then "
            "SHUTDOWN host-qmp-system-reset), as QEMU does with -no-reboot.", then=_reset),
    Command("system_powerdown", NONE, _system_powerdown,
            "Press the ACPI power button (POWERDOWN); the guest decides what follows."),
    Command("query-status", NONE, _query_status, "Run state."),
    Command("query-cpus", NONE, _query_cpus, "Each vCPU and its host thread id."),
    Command("query-hotpluggable-cpus", NONE, _query_hotpluggable_cpus,
            "The vCPUs (none can be plugged on this machine)."),
    Command("query-version", NONE, _query_version, "Version (QEMU-compatible) and package."),
    Command("query-commands", NONE, _query_commands, "The commands in this table."),
    Command("query-events", NONE, _query_events, "The events this server emits."),
    Command("query-block", NONE, _query_block,
            "Every disk slot: its device, image, read-only, direct, empty or not."),
    Command("block_set_io_throttle", THROTTLE, _block_set_io_throttle,
            "Change a disk's limits (device: its drive/node name, or id: the device's): "
            "bps and iops totals, bursts with *_max and *_max_length; 0 is no limit. The "
            "disk's next request finds them, its buckets full (docs/limits.md)."),
    Command("set_nic_io_throttle", NIC_THROTTLE, _set_nic_io_throttle,
            "Change a NIC's limits (id: the device's), ours in block_set_io_throttle's "
            "manner: rx_bps, rx_pps, tx_bps, tx_pps (bytes and frames per second each "
            "way; 0 is no limit), bursts with *_max and *_max_length (docs/limits.md)."),
    Command("query-blockstats", Object({"query-nodes": opt(Bool())}), _query_blockstats,
            "Each disk's reads, writes, flushes, bytes, failures, time and latency "
            "histograms (QEMU's BlockStats), and its rate-limiter waits (docs/metrics.md)."),
    Command("query-stats", Object({
        "target": req(Enum(("vm", "vcpu"))),
        "providers": opt(List(Object({"provider": req(Enum(("vmm", "virtio-net", "kvm"))),
                                      "names": opt(List(Str(max_length=64)))}), max_items=8)),
        "vcpus": opt(List(Str(max_length=64))),
    }), _query_stats, "vm: backend restarts and each NIC's counters; vcpu: each vCPU's "
            "exits by kind (QEMU's StatsResult shape, docs/metrics.md)."),
    Command("getfd", Object({"fdname": req(FDNAME)}), _getfd,
            "Keep the fd passed with this command (SCM_RIGHTS) under a name."),
    Command("closefd", Object({"fdname": req(FDNAME)}), _closefd, "Close a kept fd."),
    Command("blockdev-add", Object({
        "node-name": req(ID),
        "driver": opt(Enum(("raw",))),
        "file": req(FILE),
        "read-only": opt(Bool(), False),
        "cache": opt(CACHE),
        "discard": opt(Enum(("ignore", "unmap"))),
        "auto-read-only": opt(Bool()),
    }), _blockdev_add, "Record a disk configuration (the broker opens the image now)."),
    Command("blockdev-del", Object({"node-name": req(ID)}), _blockdev_del,
            "Forget an unused disk configuration."),
    Command("netdev_add", Object({
        "id": req(ID),
        "type": opt(Enum(("tap",))),
        "ifname": opt(Str(max_length=15)),
        "fds": opt(Str(max_length=64)),
        "vhost": opt(OnOff()),
    }), _netdev_add, "Record a NIC configuration on a tap (by name, or a getfd fd)."),
    Command("netdev_del", Object({"id": req(ID)}), _netdev_del,
            "Forget an unused NIC configuration."),
    Command("device_add", Object({
        "id": req(ID),
        "driver": req(Enum(("virtio-blk-mmio", "virtio-net-mmio"))),
        "addr": opt(Str(max_length=16)),
        "drive": opt(ID),
        "netdev": opt(ID),
        "bus": opt(Str(max_length=64)),
        "romfile": opt(Str()),
        "share-rw": opt(OnOff()),
        "num-queues": opt(Int(1, 1)),
        "logical_block_size": opt(Int(512, 512)),
        "physical_block_size": opt(Int(512, 512)),
        "serial": opt(Str(max_length=20)),
        "mac": opt(Str(max_length=17)),
    }), _device_add, "Fill a disk or NIC slot with a recorded configuration."),
    Command("device_del", Object({"id": req(ID)}), _device_del,
            "Empty a device's slot; DEVICE_DELETED is sent before the reply."),
)
COMMANDS = {command.name: command for command in TABLE}
assert len(COMMANDS) == len(TABLE), "a command is declared twice"
