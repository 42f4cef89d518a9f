"""The JSON file's keys (shared/docs/spec.md) and the internal names they map to.

Read by the JSON front end to parse, and by the renderer to print a configuration in
the same schema, so `-print-config` output always feeds back through `-config`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    json: str
    name: str
    type: type  # str, int, bool, or dict (an object read by its own parser, see jsonfile)
    required: bool = True


# Objects whose keys set machine-wide settings.
SECTIONS = {
    "boot-source": (
        Key("kernel_image_path", "kernel", str),
        Key("boot_args", "boot_args", str),
        Key("initrd_fs_path", "initrd", str, required=False),
    ),
    "machine-config": (
        Key("name", "name", str),
        Key("vcpu_count", "vcpus", int),
        Key("mem_size", "mem_size", int),
        Key("omit_vm_memory", "omit_vm_memory", bool, required=False),
    ),
    "serial": (Key("stdio", "serial_stdio", bool),),
}

# Lists of devices: JSON key -> (device kind, keys of each entry).
DEVICE_LISTS = {
    "drive": ("drive", (
        Key("drive_id", "id", str),
        Key("path_on_host", "path", str),
        Key("read_only", "read_only", bool),
        Key("direct", "direct", bool),
        Key("serial_num", "serial", str, required=False),
        Key("rate_limiter", "rate_limit", dict, required=False),
    )),
    "net": ("nic", (
        Key("iface_id", "id", str),
        Key("host_dev_name", "tap", str),
        Key("mac", "mac", str, required=False),
        Key("rx_rate_limiter", "rx_rate_limit", dict, required=False),
        Key("tx_rate_limiter", "tx_rate_limit", dict, required=False),
    )),
}

# Single devices: JSON key -> (device kind, keys).
DEVICE_OBJECTS = {
    "console": ("console", (
        Key("console_id", "id", str),
        Key("socket_path", "socket", str),
    )),
    "vsock": ("vsock", (
        Key("vsock_id", "id", str),
        Key("guest_cid", "guest_cid", int),
        Key("vhost", "vhost", bool, required=False),
    )),
    "rng": ("rng", (
        Key("rng_id", "id", str),
        Key("random_file", "source", str),
        Key("max_bytes", "max_bytes", int, required=False),
        Key("period", "period", int, required=False),
    )),
}

TOP_LEVEL = (*SECTIONS, *DEVICE_LISTS, *DEVICE_OBJECTS)
