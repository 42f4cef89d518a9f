"""The operator's figures on a live VM (this host's /dev/kvm, the tiny guest):
query-blockstats in QEMU's shape and query-stats through the real QMP client from PyPI
(qemu.qmp), and `stratovirt metrics` as Prometheus text read back by prometheus_client's
parser. That the counters equal a known workload is tests/unit/test_metrics.py's (and
the nested suite's, with Debian's guest reading a disk)."""

import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.framework.microvm import Microvm
from tests.framework.qmp import session

pytestmark = pytest.mark.needs_kvm
MiB = 1 << 20
QEMU_MEMBERS = {"rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations",
                "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "rd_merged",
                "wr_merged", "failed_rd_operations", "failed_wr_operations",
                "invalid_rd_operations", "invalid_wr_operations", "account_invalid",
                "account_failed", "timed_stats"}


@pytest.fixture(scope="module")
def vm(tmp_path_factory, tiny_guest):
    workdir = tmp_path_factory.mktemp("metrics")
    (workdir / "d0.img").write_bytes(bytes(4 * MiB))
    vm = Microvm(workdir, tiny_guest, "-smp", "2", "-drive",
                 f"file={workdir / 'd0.img'},id=d0,throttling.iops-total=100",
                 append="wait")
    vm.spawn().wait_for_api()
    yield vm
    vm.kill()


def ask(vm, *commands):
    async def steps(client, events):
        return [await client.execute(name, arguments) for name, arguments in commands]
    return session(vm.api, steps)


def test_query_blockstats_has_qemus_shape(vm):
    [stats] = ask(vm, ("query-blockstats", {}))
    [disk] = stats
    assert disk["device"] == "d0" and disk["node-name"] == "d0"
    assert QEMU_MEMBERS <= disk["stats"].keys()
    assert disk["stats"]["rd_operations"] == disk["stats"]["wr_operations"] == 0
    histogram = disk["stats"]["rd_latency_histogram"]
    assert len(histogram["bins"]) == len(histogram["boundaries"]) + 1
    assert histogram["boundaries"] == sorted(histogram["boundaries"])


def test_query_stats_vcpus_count_their_exits_and_filters_work(vm):
    vcpus, only_one, vm_stats, filtered = ask(
        vm, ("query-stats", {"target": "vcpu"}),
        ("query-stats", {"target": "vcpu", "vcpus": ["/machine/unattached/device[1]"]}),
        ("query-stats", {"target": "vm"}),
        ("query-stats", {"target": "vm", "providers": [{"provider": "virtio-net"}]}))
    assert [v["qom-path"] for v in vcpus] == [f"/machine/unattached/device[{i}]" for i in (0, 1)]
    for vcpu in vcpus:
        values = {s["name"]: s["value"] for s in vcpu["stats"]}
        assert vcpu["provider"] == "kvm"
        assert values["exits"] == sum(v for k, v in values.items() if k.startswith("exits-"))
    # The boot processor ran the guest (its port I/O to the serial port, at least); the
    # other waits for a SIPI the tiny guest never sends.
    boot = {s["name"]: s["value"] for s in vcpus[0]["stats"]}
    assert boot["exits"] > 0 and boot["exits-io"] > 0, boot
    assert [v["qom-path"] for v in only_one] == ["/machine/unattached/device[1]"]
    assert [entry["provider"] for entry in vm_stats] == ["vmm"]
    assert filtered == []


def test_stratovirt_metrics_prints_prometheus_text(vm):
    run = subprocess.run([sys.executable, "-m", "vmm", "metrics", f"unix:{vm.api}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    families = {f.name: f for f in text_string_to_metric_families(run.stdout)}
    assert families["stratovirt_block_rd_operations"].type == "counter"
    assert families["stratovirt_block_read_latency_seconds"].type == "histogram"
    exits = {s.labels["vcpu"]: s.value for s in families["stratovirt_vcpu_exits"].samples}
    assert exits.keys() == {"0", "1"} and exits["0"] > 0


@pytest.mark.parametrize("argv,message", [
    (["metrics"], "usage: stratovirt metrics unix:API_SOCKET [--json]"),
    (["metrics", "/tmp/x.sock"], "usage: stratovirt metrics unix:API_SOCKET [--json]"),
    (["metrics", "unix:/nonexistent/api.sock"],
     "stratovirt: error: metrics: /nonexistent/api.sock: No such file or directory"),
])
def test_stratovirt_metrics_refusals(argv, message):
    run = subprocess.run([sys.executable, "-m", "vmm", *argv], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode in (1, 2) and run.stderr.strip() == message, run.stderr
    assert "Traceback" not in run.stderr


def test_the_metrics_file_is_written_parses_and_goes_at_exit(tmp_path, tiny_guest):
    """-metrics PATH: written by the launcher under its seccomp filter (replaced through a
    rename), parsed by prometheus_client, with the vCPUs' exits the vm process sends;
    removed, with its scratch file, when the VM ends."""
    (tmp_path / "d.img").write_bytes(bytes(MiB))
    out = tmp_path / "prom" / "vm.prom"
    out.parent.mkdir()
    vm = Microvm(tmp_path, tiny_guest, "-drive", f"file={tmp_path / 'd.img'},id=disk0",
                 "-metrics", str(out), append="wait")
    vm.spawn().wait_for_api()
    try:
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline and vm.process.poll() is None:
            time.sleep(0.1)
        families = {f.name: f for f in text_string_to_metric_families(out.read_text())}
        [sample] = families["stratovirt_block_rd_operations"].samples
        assert sample.labels == {"device": "disk0"} and sample.value == 0
        [restarts] = families["stratovirt_vmm_backend_restarts"].samples
        assert restarts.labels == {"device": "disk0"} and restarts.value == 0
        first = out.stat().st_mtime_ns
        deadline = time.monotonic() + 30
        while out.stat().st_mtime_ns == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out.stat().st_mtime_ns != first, "not written again"
        # The vCPUs' exits: sent by the vm process every 5 s, in the next file after.
        deadline = time.monotonic() + 30
        while "stratovirt_vcpu_exits_total" not in out.read_text() and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        families = {f.name: f for f in text_string_to_metric_families(out.read_text())}
        [exits] = families["stratovirt_vcpu_exits"].samples
        assert exits.labels == {"vcpu": "0"} and exits.value > 0
    finally:
        ask(vm, ("quit", {}))
        vm.process.wait(30)
    assert vm.process.returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.parametrize("where,message", [
    ("missing/vm.prom", 'the directory of metrics file "{dir}/missing/vm.prom" does not exist'),
    (".", 'metrics file "{dir}" is not a regular file'),
])
def test_bad_metrics_paths_are_refused(tmp_path, tiny_guest, where, message):
    run = subprocess.run([sys.executable, "-m", "vmm", "-kernel", str(tiny_guest),
                          "-api-channel", f"unix:{tmp_path / 'api.sock'}",
                          "-metrics", str(tmp_path / where)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().startswith(f"stratovirt: error: -metrics: "
                                         f"{message.format(dir=tmp_path)}"), run.stderr
    assert not (tmp_path / "api.sock").exists()
