"""The operator's figures (docs/metrics.md): QMP's query-blockstats in QEMU's shape,
query-stats in QEMU's StatsResult shape, and the Prometheus text `stratovirt metrics`
prints.

Where they are counted: a disk's reads, writes, flushes, bytes, failures, latency and
rate-limiter waits, and a NIC's frames, bytes, drops and waits, by the backend's C data
path, in the device's page (vmm/virtio/device_page.py), per queue and without a message;
the launcher reads the pages when asked (the broker's `stats`). A vCPU's exits by kind
by its own thread (vmm/machine/vcpu.py); backend restarts and seccomp faults by the
launcher, which tells the vm process with its restart news; guest errors by the bounded
guest log (vmm/log_limit.py), a backend's into its page. Nothing here runs unless a
client asks, or -metrics has the launcher write the file every FILE_INTERVAL s.
"""

import logging
import os
import time

from . import layout
from .log_limit import guest as guest_lines
from .devices.virtio.slots import DISK, NIC

log = logging.getLogger(__name__)

_READ, _WRITE, _FLUSH, _OTHER = 0, 1, 2, 3
FILE_INTERVAL = 5.0             # seconds between two writes of the -metrics file
LATENCY_BOUNDS_NS = tuple(16_000 << i for i in range(15))     # then +Inf (native/blkio.h)


def _stat(name: str, value) -> dict:
    return {"name": name, "value": value}


def _device_counters(hotplug) -> dict[int, dict]:
    reply, _ = hotplug.ask_launcher("stats", "stats")
    return {entry["slot"]: entry for entry in reply["devices"]}


def blockstats(hotplug) -> list[dict]:
    """query-blockstats: one BlockStats per occupied disk slot."""
    counters = _device_counters(hotplug)
    return [block_entry(occupant.id, occupant.config or occupant.id, counters[slot]["counters"])
            for slot, occupant in hotplug.occupants(DISK) if slot in counters]


def block_entry(device: str, node: str, c: dict) -> dict:
    """A disk's BlockStats from its page's counters (DevicePage.read_blk): QEMU's members;
    those we do not count -- merged, invalid, unmap -- are 0, as QEMU allows."""
    ops, failed, data, total, latency = c["ops"], c["failed"], c["bytes"], c["total_ns"], \
        c["latency"]
    stats = {
        "rd_bytes": data[_READ], "wr_bytes": data[_WRITE], "unmap_bytes": 0,
        "rd_operations": ops[_READ] - failed[_READ],
        "wr_operations": ops[_WRITE] - failed[_WRITE],
        "flush_operations": ops[_FLUSH] - failed[_FLUSH], "unmap_operations": 0,
        "rd_total_time_ns": total[_READ], "wr_total_time_ns": total[_WRITE],
        "flush_total_time_ns": total[_FLUSH], "unmap_total_time_ns": 0,
        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
        "failed_rd_operations": failed[_READ], "failed_wr_operations": failed[_WRITE],
        "failed_flush_operations": failed[_FLUSH], "failed_unmap_operations": 0,
        "invalid_rd_operations": 0, "invalid_wr_operations": 0,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
        "account_invalid": False, "account_failed": True, "timed_stats": [],
        "rd_latency_histogram": {"boundaries": list(LATENCY_BOUNDS_NS), "bins": latency[_READ]},
        "wr_latency_histogram": {"boundaries": list(LATENCY_BOUNDS_NS), "bins": latency[_WRITE]},
        # Ours (QEMU has no such member): requests that waited for the rate limiter,
        # and GET_ID, DISCARD, WRITE_ZEROES and malformed requests.
        "x-throttled-operations": c["throttled"], "x-other-operations": ops[_OTHER],
        "x-failed-other-operations": failed[_OTHER],
        # What the guest got wrong that the backend noticed (vmm/log_limit.py).
        "x-guest-errors": c["guest_errors"],
    }
    return {"device": device, "node-name": node, "qdev": f"/machine/peripheral/{device}",
            "stats": stats}


def nic_entry(device: str, c: dict) -> dict:
    """A NIC's StatsResult entry from its page's counters (DevicePage.read_net)."""
    return {"provider": "virtio-net", "qom-path": f"/machine/peripheral/{device}",
            "stats": [_stat(f"{direction}-{name.replace('_', '-')}", value)
                      for direction in ("rx", "tx") for name, value in c[direction].items()]
            + [_stat("guest-errors", c["guest_errors"])]}


def vcpu_entry(index: int, exits: dict[str, int]) -> dict:
    """One vCPU's exits by kind, as query-stats gives them (provider kvm)."""
    return {"provider": "kvm", "qom-path": f"/machine/unattached/device[{index}]",
            "stats": [_stat("exits", sum(exits.values()))] +
                     [_stat(f"exits-{kind}", count) for kind, count in sorted(exits.items())]}


def restarts_entry(restarts: dict[str, int], faults: dict[str, int]) -> dict:
    """Provider vmm: backend restarts per device, seccomp faults per role (processes a
    violation ended)."""
    return {"provider": "vmm", "stats": [_stat(f"backend-restarts-{device}", count)
                                         for device, count in sorted(restarts.items())] +
            [_stat(f"seccomp-faults-{role}", count) for role, count in sorted(faults.items())]}


def stats(hotplug, machine, target: str, providers: list | None,
          vcpus: list | None = None) -> list[dict]:
    """query-stats: target "vm" gives provider "vmm" (backend restarts per device, seccomp
    faults per role, guest errors by kind) and
    "virtio-net" (each NIC's counters); target "vcpu" gives provider "kvm" (each vCPU's
    exits by kind). providers: [{"provider", "names"?}] and vcpus (qom-paths) filter, as
    QEMU's do."""
    wanted = {p["provider"]: p.get("names") for p in providers} if providers else None
    results = []

    def add(provider: str, qom_path: str | None, values: list[dict]) -> None:
        if wanted is not None:
            if provider not in wanted:
                return
            if wanted[provider]:
                values = [v for v in values if v["name"] in wanted[provider]]
        entry = {"provider": provider, "stats": values}
        if qom_path:
            entry["qom-path"] = qom_path
        results.append(entry)

    if target == "vcpu":
        for thread in machine.vcpus:
            entry = vcpu_entry(thread.vcpu.index, thread.exit_counts())
            if vcpus is None or entry["qom-path"] in vcpus:
                add("kvm", entry["qom-path"], entry["stats"])
        return results
    entries = [restarts_entry(hotplug.restarts, hotplug.seccomp_faults)]
    # The vm process's own (transport registers, rings it reads), summed by kind.
    by_kind: dict[str, int] = {}
    for (_, kind), count in guest_lines.counts().items():
        slug = "-".join(kind.lower().split())
        by_kind[slug] = by_kind.get(slug, 0) + count
    entries[0]["stats"] += [_stat(f"guest-errors-{kind}", count)
                            for kind, count in sorted(by_kind.items())]
    counters = _device_counters(hotplug)
    entries += [nic_entry(occupant.id, counters[slot]["counters"])
                for slot, occupant in hotplug.occupants(NIC) if slot in counters]
    for entry in entries:
        add(entry["provider"], entry.get("qom-path"), entry["stats"])
    return results


def prometheus(block: list[dict], vm: list[dict], vcpus: list[dict]) -> str:
    """The text exposition format (what node_exporter's textfile collector reads) of
    query-blockstats and query-stats answers: one family per figure, its samples
    labelled by device or vCPU."""
    families: dict[str, tuple[str, str, list]] = {}

    def sample(name: str, kind: str, text: str, labels: dict, value, suffix: str = "") -> None:
        families.setdefault(name, (kind, text, []))[2].append((suffix, labels, value))

    for member, text in (
            ("rd_operations", "Reads completed"), ("wr_operations", "Writes completed"),
            ("flush_operations", "Flushes completed"), ("rd_bytes", "Bytes read"),
            ("wr_bytes", "Bytes written"), ("failed_rd_operations", "Reads that failed"),
            ("failed_wr_operations", "Writes that failed"),
            ("failed_flush_operations", "Flushes that failed"),
            ("x-throttled-operations", "Requests that waited for the rate limiter"),
            ("x-other-operations", "GET_ID, DISCARD, WRITE_ZEROES and malformed requests"),
            ("x-guest-errors", "What the guest got wrong that the disk's backend noticed")):
        name = "block_" + member.removeprefix("x-").replace("-", "_") + "_total"
        for b in block:
            sample(name, "counter", text, {"device": b["device"]}, b["stats"][member])
    for direction, label in (("rd", "read"), ("wr", "write")):
        name = f"block_{label}_latency_seconds"
        for b in block:
            histogram = b["stats"][f"{direction}_latency_histogram"]
            running, labels = 0, {"device": b["device"]}
            for bound, count in zip([*histogram["boundaries"], None], histogram["bins"]):
                running += count
                le = "+Inf" if bound is None else repr(bound / 1e9)
                sample(name, "histogram", f"Completed {label}s by latency", labels | {"le": le},
                       running, "_bucket")
            sample(name, "histogram", "", labels,
                   b["stats"][f"{direction}_total_time_ns"] / 1e9, "_sum")
            sample(name, "histogram", "", labels, running, "_count")
    for entry in vm:
        device = entry.get("qom-path", "").rsplit("/", 1)[-1]
        for s in entry["stats"]:
            stat = s["name"]
            labels = {"device": device} if device else {}
            if stat.startswith("backend-restarts-"):
                stat, labels = "backend-restarts", {"device": stat.removeprefix("backend-restarts-")}
            elif stat.startswith("guest-errors-"):
                stat, labels = "guest-errors", {"kind": stat.removeprefix("guest-errors-")}
            elif stat.startswith("seccomp-faults-"):
                stat, labels = "seccomp-faults", {"role": stat.removeprefix("seccomp-faults-")}
            name = f"{entry['provider']}_{stat}_total".replace("-", "_")
            sample(name, "counter", f"{entry['provider']} {stat}", labels, s["value"])
    for entry in vcpus:
        vcpu = entry["qom-path"].rsplit("[", 1)[-1].rstrip("]")
        for s in entry["stats"]:
            sample(f"vcpu_{s['name']}_total".replace("-", "_"), "counter",
                   f"vCPU {s['name']}", {"vcpu": vcpu}, s["value"])
    lines = []
    for name, (kind, text, samples) in families.items():
        lines += [f"# HELP stratovirt_{name} {text}", f"# TYPE stratovirt_{name} {kind}"]
        for suffix, labels, value in samples:
            shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"stratovirt_{name}{suffix}{{{shown}}} {value}")
    return "\n".join(lines) + "\n"


class MetricsFile:
    """-metrics PATH, kept by the launcher: every FILE_INTERVAL s the disks' and NICs'
    counters from their pages and the backend restarts, as Prometheus text written to
    PATH.tmp and renamed over PATH, so node_exporter's textfile collector never reads
    half a file. The vCPUs' exits are counted in the vm process, which sends them every
    FILE_INTERVAL s (vm_process._push_vcpu_exits): the file shows the last it sent."""

    def __init__(self, path, broker, policy, faults: dict[str, int]):
        """faults: the launcher's seccomp faults per role, as it counts them."""
        self.path = path
        self.scratch = path.with_name(path.name + ".tmp")
        self.broker, self.policy, self.faults = broker, policy, faults
        self.due = time.monotonic()
        self.vcpus: list[dict] = []         # vcpu_entry of each, from the vm process's last

    def take_vcpu_exits(self, exits) -> None:
        """The vm process's [[index, {kind: count}], ...]; anything else is dropped."""
        try:
            self.vcpus = [vcpu_entry(int(index), {str(kind): int(count)
                                                  for kind, count in counts.items()})
                          for index, counts in exits]
        except (TypeError, ValueError, AttributeError):
            log.warning("-metrics: a malformed vcpu-exits event from the vm process")

    def write(self) -> None:
        self.due = time.monotonic() + FILE_INTERVAL
        block, vm, restarts = [], [], {}
        for slot, backend in sorted(self.broker.backends.items()):
            restarts[backend.device] = self.policy.restarts(slot)
            page = backend.attached.page
            if page is None:
                continue
            if slot < layout.BLK_SLOTS:
                block.append(block_entry(backend.device, backend.device, page.read_blk()))
            else:
                vm.append(nic_entry(backend.device, page.read_net()))
        text = prometheus(block, [restarts_entry(restarts, self.faults), *vm], self.vcpus)
        try:
            fd = os.open(self.scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            os.replace(self.scratch, self.path)
        except OSError as error:
            log.warning("-metrics: %s: %s; tried again in %.0f s", self.path, error.strerror,
                        FILE_INTERVAL)


USAGE = "usage: stratovirt metrics unix:API_SOCKET [--json]"


def main(argv: list[str]) -> int:
    """`stratovirt metrics unix:PATH [--json]`: a running VM's figures over its
    api-channel, as Prometheus text (default) or the three QMP answers as JSON."""
    import json
    import socket
    import sys
    args = [a for a in argv if a != "--json"]
    if len(args) != 1 or not args[0].startswith("unix:") or len(argv) - len(args) > 1:
        print(USAGE, file=sys.stderr)
        return 2
    path = args[0][len("unix:"):]
    answers = {}
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            stream = sock.makefile("rw")
            stream.readline()                                      # the greeting
            for key, command, arguments in (
                    ("capabilities", "qmp_capabilities", {}),
                    ("blockstats", "query-blockstats", {}),
                    ("vm", "query-stats", {"target": "vm"}),
                    ("vcpu", "query-stats", {"target": "vcpu"})):
                stream.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
                stream.flush()
                while True:
                    line = stream.readline()
                    if not line:
                        raise ConnectionError("the VM closed the api-channel")
                    answer = json.loads(line)
                    if "event" not in answer:
                        break
                if "error" in answer:
                    raise ConnectionError(f"{command}: {answer['error'].get('desc')}")
                answers[key] = answer["return"]
    except (OSError, ValueError) as error:
        print(f"stratovirt: error: metrics: {path}: {getattr(error, 'strerror', None) or error}",
              file=sys.stderr)
        return 1
    if "--json" in argv:
        print(json.dumps({"query-blockstats": answers["blockstats"],
                          "query-stats vm": answers["vm"],
                          "query-stats vcpu": answers["vcpu"]}, indent=2))
    else:
        sys.stdout.write(prometheus(answers["blockstats"], answers["vm"], answers["vcpu"]))
    return 0
