"""MachineConfig -> the JSON document of `-config` (what `-print-config` prints).

Options that the JSON schema has no key for (-api-channel, -D, -pidfile, -daemonize,
-disable-seccomp) are not part of the document: they go with -config on the command
line, as spec.md says.
"""

import json

from . import ratelimit
from .model import MachineConfig
from .schema import DEVICE_LISTS, DEVICE_OBJECTS, SECTIONS


def to_document(config: MachineConfig) -> dict:
    values = {
        "kernel": str(config.boot.kernel), "boot_args": config.boot.boot_args,
        "initrd": config.boot.initrd and str(config.boot.initrd),
        "name": config.machine.name, "vcpus": config.machine.vcpus,
        "mem_size": config.machine.mem_size,
        "omit_vm_memory": config.machine.omit_vm_memory,
        "serial_stdio": config.serial_stdio,
    }
    document = {section: _entry(keys, values) for section, keys in SECTIONS.items()}
    devices = {"drive": config.drives, "nic": config.nics,
               "console": [config.console] if config.console else [],
               "vsock": [config.vsock] if config.vsock else [],
               "rng": [config.rng] if config.rng else []}
    for key, (kind, keys) in DEVICE_LISTS.items():
        document[key] = [_entry(keys, _fields(d)) for d in devices[kind]]
    for key, (kind, keys) in DEVICE_OBJECTS.items():
        if devices[kind]:
            document[key] = _entry(keys, _fields(devices[kind][0]))
    return document


def to_json(config: MachineConfig) -> str:
    return json.dumps(to_document(config), indent=2)


def _fields(device) -> dict:
    return {name: str(value) if name in ("path", "socket", "source") and value else
            ratelimit.to_json(value) if name.endswith("rate_limit") and value else
            None if name == "vhost" and not value else value
            for name, value in vars(device).items()}


def _entry(keys, values: dict) -> dict:
    return {k.json: values[k.name] for k in keys if values[k.name] is not None}
