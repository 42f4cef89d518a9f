"""The counters the data paths keep in a device's page (vmm/virtio/device_page.py,
docs/metrics.md) add up: after a known workload from the independent host-side driver,
against a confined backend forked as the launcher forks it, each counter equals what
was done -- N reads of M bytes are N reads and N x M bytes, every one in the latency
histogram; failures are failures; frames and bytes sent are counted; a backend forked
again on the same page counts on. And the Prometheus text of those counters parses
with prometheus_client's own parser."""

import struct
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.framework import disk_backend
from tests.framework.blk_load import READ, WRITE, ClosedLoop
from tests.framework.virtio_driver import DATA_GPA, Driver
from tests.framework.net_backend import transmit
from tests.unit.test_vhost_user_net import udp_frame
from vmm import metrics
from vmm.virtio.device_page import DevicePage

MiB = 1 << 20
DISK = 16 * MiB
FEATURES = (1 << 32) | (1 << 29)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


def start(image, page, direct=True):
    child, connection = disk_backend.spawn(image, direct=direct, limits=page)
    driver = Driver(connection, num=256)
    driver.start(FEATURES)
    return child, connection, driver


def stop(child, connection, driver):
    assert child.status is None, child.describe_end()
    driver.close()
    connection.close()
    child.kill()


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_reads_and_writes_add_up(image, direct):
    page = DevicePage()
    made = start(image, page, direct)
    try:
        reads = ClosedLoop(made[2], READ, 4096, 32, DISK).run(0.5)
        writes = ClosedLoop(made[2], WRITE, 8192, 8, DISK).run(0.5)
    finally:
        stop(*made)
    n, m = reads.done, writes.done
    c = page.read_blk()
    assert c["ops"][:3] == [n, m, 0] and c["failed"] == [0, 0, 0, 0]
    assert c["bytes"] == [n * 4096, m * 8192]
    assert [sum(bins) for bins in c["latency"]] == [n, m]
    assert c["total_ns"][0] > 0 and c["total_ns"][1] > 0 and c["throttled"] == 0


def test_failures_and_other_requests_are_counted_apart(image):
    page = DevicePage()
    child, connection, driver = start(image, page)
    try:
        header, status = DATA_GPA, DATA_GPA + 0x1000
        for sector in (0, DISK // 512):          # the second is past the end: IOERR
            driver.memory.write(header, struct.pack("<IIQ", 0, 0, sector))
            driver.submit([(header, 16, False), (DATA_GPA + 0x2000, 4096, True),
                           (status, 1, True)])
            driver.completion()
        driver.memory.write(header, struct.pack("<IIQ", 8, 0, 0))            # GET_ID
        driver.submit([(header, 16, False), (DATA_GPA + 0x2000, 20, True), (status, 1, True)])
        driver.completion()
    finally:
        stop(child, connection, driver)
    c = page.read_blk()
    assert c["ops"] == [2, 0, 0, 1] and c["failed"] == [1, 0, 0, 0]
    assert c["bytes"] == [4096, 0] and sum(c["latency"][0]) == 1


def test_what_the_guest_got_wrong_is_counted_in_the_page(image):
    """A chain outside guest RAM breaks the ring: the backend logs it (bounded,
    vmm/log_limit.py) and counts it where the launcher reads it."""
    page = DevicePage()
    child, connection, driver = start(image, page)
    try:
        driver.write_descriptor(0, 1 << 40, 16, 0, 0)
        driver.publish(0)
        deadline = time.monotonic() + 10
        while page.read_blk()["guest_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop(child, connection, driver)
    assert page.read_blk()["guest_errors"] == 1


def test_a_backend_forked_again_counts_on(image):
    page = DevicePage()
    first = start(image, page)
    try:
        n = ClosedLoop(first[2], READ, 4096, 4, DISK).run(0.2).done
    finally:
        stop(*first)
    second = start(image, page)
    try:
        m = ClosedLoop(second[2], READ, 4096, 4, DISK).run(0.2).done
    finally:
        stop(*second)
    assert page.read_blk()["ops"][0] == n + m


@pytest.mark.needs_root
def test_transmitted_frames_add_up(nic):
    page = DevicePage()
    driver, _, tap_mac = nic(page)
    frame = udp_frame(tap_mac, bytes(500))
    _, times = transmit(driver, frame, 0.3)
    c = page.read_net()
    assert c["tx"]["frames"] == len(times) and c["tx"]["bytes"] == len(times) * len(frame)
    assert c["tx"]["dropped"] == c["tx"]["bad_chains"] == c["tx"]["throttled"] == 0


def test_prometheus_text_parses_and_carries_the_counts():
    """The exposition of query-blockstats / query-stats answers, read back by the
    Prometheus project's own parser."""
    bins = [0] * 16
    bins[2], bins[15] = 7, 1
    stats = {"rd_operations": 8, "wr_operations": 3, "flush_operations": 1, "rd_bytes": 32768,
             "wr_bytes": 12288, "failed_rd_operations": 0, "failed_wr_operations": 1,
             "failed_flush_operations": 0, "x-throttled-operations": 2, "x-other-operations": 1,
             "rd_total_time_ns": 9_000_000, "wr_total_time_ns": 0, "x-guest-errors": 4,
             "rd_latency_histogram": {"boundaries": list(metrics.LATENCY_BOUNDS_NS), "bins": bins},
             "wr_latency_histogram": {"boundaries": list(metrics.LATENCY_BOUNDS_NS),
                                      "bins": [0] * 16}}
    text = metrics.prometheus(
        [{"device": "rootfs", "stats": stats}],
        [{"provider": "vmm", "stats": [{"name": "backend-restarts-rootfs", "value": 1},
                                       {"name": "guest-errors-broken-ring", "value": 3},
                                       {"name": "seccomp-faults-virtio-net", "value": 2}]},
         {"provider": "virtio-net", "qom-path": "/machine/peripheral/net0",
          "stats": [{"name": "tx-frames", "value": 5}]}],
        [{"provider": "kvm", "qom-path": "/machine/unattached/device[0]",
          "stats": [{"name": "exits", "value": 40}, {"name": "exits-io", "value": 30}]}])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("stratovirt_block_rd_operations_total", (("device", "rootfs"),))] == 8
    assert samples[("stratovirt_block_throttled_operations_total", (("device", "rootfs"),))] == 2
    read = "stratovirt_block_read_latency_seconds"
    assert samples[(f"{read}_bucket", (("device", "rootfs"), ("le", "6.4e-05")))] == 7
    assert samples[(f"{read}_bucket", (("device", "rootfs"), ("le", "+Inf")))] == 8
    assert samples[(f"{read}_count", (("device", "rootfs"),))] == 8
    assert samples[(f"{read}_sum", (("device", "rootfs"),))] == pytest.approx(0.009)
    assert samples[("stratovirt_vmm_backend_restarts_total", (("device", "rootfs"),))] == 1
    assert samples[("stratovirt_vmm_guest_errors_total", (("kind", "broken-ring"),))] == 3
    assert samples[("stratovirt_vmm_seccomp_faults_total", (("role", "virtio-net"),))] == 2
    assert samples[("stratovirt_block_guest_errors_total", (("device", "rootfs"),))] == 4
    assert samples[("stratovirt_virtio_net_tx_frames_total", (("device", "net0"),))] == 5
    assert samples[("stratovirt_vcpu_exits_io_total", (("vcpu", "0"),))] == 30
