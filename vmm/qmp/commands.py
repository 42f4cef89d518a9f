"""The QMP commands: each takes the machine and the arguments, returns the `return` value
or raises QmpError. Shapes follow QEMU's schema, as StratoVirt v0.1.0 does."""

import os

from .. import __version__


class QmpError(Exception):
    def __init__(self, error_class: str, desc: str):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def query_status(machine, args):
    status = "running" if machine.running else "paused"
    return {"running": machine.running, "singlestep": False, "status": status}


def stop(machine, args):
    machine.pause()
    return {}


def cont(machine, args):
    machine.resume()
    return {}


def quit_(machine, args):
    # The reply goes out first; the server ends the machine after sending it.
    return {}


def query_cpus(machine, args):
    return [{"CPU": t.vcpu.index, "current": t.vcpu.index == 0, "halted": False,
             "qom_path": f"/machine/unattached/device[{t.vcpu.index}]", "arch": "x86",
             "thread_id": t.native_id or 0} for t in machine.vcpus]


def query_hotpluggable_cpus(machine, args):
    return [{"type": "host-x86-cpu", "vcpus-count": 1,
             "props": {"socket-id": 0, "core-id": t.vcpu.index, "thread-id": 0},
             "qom-path": f"/machine/unattached/device[{t.vcpu.index}]"} for t in machine.vcpus]


def query_version(machine, args):
    major, minor, micro = (int(part) for part in __version__.split("."))
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"stratovirt-py {__version__} (pid {os.getpid()})"}


COMMANDS = {
    "query-status": query_status,
    "stop": stop,
    "cont": cont,
    "quit": quit_,
    "query-cpus": query_cpus,
    "query-hotpluggable-cpus": query_hotpluggable_cpus,
    "query-version": query_version,
}


def query_commands(machine, args):
    return [{"name": name} for name in ("qmp_capabilities", *COMMANDS)]


COMMANDS["query-commands"] = query_commands
