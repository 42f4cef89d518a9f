"""Rate limits as written (vmm/config/ratelimit.py, docs/limits.md): QEMU's throttling.*
on -drive in both command-line forms, Firecracker's rate_limiter in the JSON file, the
same model from each, printed back by -print-config; every bad value refused in one
line naming where it is and what is allowed."""

import json

import pytest

from tests.framework.cli import stratovirt
from vmm.config.model import Bucket, RateLimit
from vmm.config.ratelimit import MAX_TOKENS, rate_bucket


def printed(result) -> dict:
    assert result.code == 0, result
    return json.loads(result.out)


def drive_json(files, **extra) -> dict:
    return {"drive": [{"drive_id": "d", "path_on_host": str(files.disks[0]), "read_only": False,
                       "direct": False, **extra}]}


def test_qemu_rates_are_buckets_of_a_tenth_of_a_second():
    assert rate_bucket(4000, None, None) == Bucket(400, 100)
    assert rate_bucket(50 << 20, None, None) == Bucket(5 << 20, 100)
    # Not divisible by ten: the shortest refill time with whole tokens, the rate exact.
    assert rate_bucket(7, None, None) == Bucket(7, 1000)
    assert rate_bucket(1048576, None, None) == Bucket(131072, 125)
    assert rate_bucket(25, None, None) == Bucket(3, 120)
    # A burst rate M for L seconds: a bucket of M*L refilled at the average rate.
    assert rate_bucket(100, 500, 2) == Bucket(1000, 10_000)


def test_throttling_on_a_seed_drive(files):
    doc = printed(stratovirt(*files.base(), "-drive",
                             f"id=d,file={files.disks[0]},throttling.iops-total=4000,"
                             f"throttling.bps-total=52428800", "-print-config"))
    assert doc["drive"][0]["rate_limiter"] == {
        "ops": {"size": 400, "one_time_burst": 0, "refill_time": 100},
        "bandwidth": {"size": 5242880, "one_time_burst": 0, "refill_time": 100}}


def test_throttling_on_a_2x_drive_is_the_same(files):
    doc = printed(stratovirt("-kernel", str(files.kernel), "-qmp", f"unix:{files.api},server,nowait",
                             "-drive", f"id=d,file={files.disks[0]},throttling.iops-total=4000,"
                             "throttling.iops-total-max=8000,throttling.iops-total-max-length=2",
                             "-device", "virtio-blk-device,drive=d,id=disk0", "-print-config"))
    assert doc["drive"][0]["rate_limiter"] == {
        "ops": {"size": 16000, "one_time_burst": 0, "refill_time": 4000}}


def test_json_rate_limiter_round_trips(files):
    limiter = {"bandwidth": {"size": 1 << 20, "one_time_burst": 1 << 30, "refill_time": 100},
               "ops": {"size": 100, "one_time_burst": 0, "refill_time": 1000}}
    path = files.write_json(drive_json(files, rate_limiter=limiter))
    doc = printed(stratovirt("-config", str(path), *files.base(), "-print-config"))
    assert doc["drive"][0]["rate_limiter"] == limiter
    again = files.write_json(doc, "again.json")
    assert printed(stratovirt("-config", str(again), *files.base(), "-print-config")) == doc


def test_one_time_burst_may_be_left_out(files):
    path = files.write_json(drive_json(files, rate_limiter={"ops": {"size": 10, "refill_time": 1}}))
    doc = printed(stratovirt("-config", str(path), *files.base(), "-print-config"))
    assert doc["drive"][0]["rate_limiter"]["ops"]["one_time_burst"] == 0


def test_a_drive_without_limits_prints_none(files):
    doc = printed(stratovirt(*files.base(), "-drive", f"id=d,file={files.disks[0]}", "-print-config"))
    assert "rate_limiter" not in doc["drive"][0]


@pytest.mark.parametrize("props,error", [
    ("throttling.iops-total=0", "-drive[0].throttling.iops-total: 0 is out of range; "
     f"allowed 1..{MAX_TOKENS}; omit the limit for none"),
    ("throttling.iops-total=-1", '-drive[0].throttling.iops-total: "-1" is not a whole number'),
    ("throttling.bps-total=lots", '-drive[0].throttling.bps-total: "lots" is not a whole number'),
    ("throttling.bps-total=1.5", '-drive[0].throttling.bps-total: "1.5" is not a whole number'),
    (f"throttling.bps-total={1 << 63}", f"-drive[0].throttling.bps-total: {1 << 63} is out of "
     f"range; allowed 1..{MAX_TOKENS}"),
    ("throttling.bps-total", "-drive[0].throttling.bps-total: has no value"),
    ("throttling.iops-read=5", "-drive[0].throttling.iops-read: unknown property"),
    ("throttling.iops-total-max=10", "-drive[0].throttling.iops-total-max: without "
     "throttling.iops-total; a burst needs the average rate"),
    ("throttling.iops-total=10,throttling.iops-total-max=5",
     "-drive[0].throttling.iops-total-max: 5 is below the average rate 10"),
    ("throttling.iops-total=10,throttling.iops-total-max-length=5",
     "-drive[0].throttling.iops-total-max-length: without throttling.iops-total-max"),
    ("throttling.iops-total=10,throttling.iops-total-max=20,throttling.iops-total-max-length=0",
     "-drive[0].throttling.iops-total-max-length: 0 is out of range; allowed 1..3600"),
    ("throttling.iops-total=1,throttling.iops-total-max=3600,throttling.iops-total-max-length=3600",
     "-drive[0].throttling.iops-total-max: the burst would take more than an hour to refill"),
])
def test_bad_throttling_refused(files, props, error):
    result = stratovirt(*files.base(), "-drive", f"id=d,file={files.disks[0]},{props}")
    assert result.error.startswith(error), result.error


@pytest.mark.parametrize("limiter,error", [
    ({}, "drive[0].rate_limiter: has no bucket; give bandwidth, ops or both"),
    ([], "drive[0].rate_limiter: is a list; an object with the keys bandwidth, ops"),
    ({"iops": {}}, "drive[0].rate_limiter.iops: unknown key; the keys are bandwidth, ops"),
    ({"ops": {"size": 10}}, "drive[0].rate_limiter.ops.refill_time: missing; a bucket with a "
     "size needs a refill_time in ms, 1..3600000"),
    ({"ops": {"refill_time": 10}}, "drive[0].rate_limiter.ops.size: missing"),
    ({"ops": {"size": 0, "refill_time": 10}},
     f"drive[0].rate_limiter.ops.size: 0 is out of range; allowed 1..{MAX_TOKENS}"),
    ({"ops": {"size": -3, "refill_time": 10}}, "drive[0].rate_limiter.ops.size: -3 is out of range"),
    ({"ops": {"size": "10", "refill_time": 10}},
     "drive[0].rate_limiter.ops.size: is a string; a whole number is expected"),
    ({"ops": {"size": 1.5, "refill_time": 10}}, "drive[0].rate_limiter.ops.size: is a fractional number"),
    ({"bandwidth": {"size": 1 << 63, "refill_time": 10}},
     f"drive[0].rate_limiter.bandwidth.size: {1 << 63} is out of range"),
    ({"ops": {"size": 10, "refill_time": 0}},
     "drive[0].rate_limiter.ops.refill_time: 0 ms is out of range; allowed 1..3600000"),
    ({"ops": {"size": 10, "refill_time": 3600001}},
     "drive[0].rate_limiter.ops.refill_time: 3600001 ms is out of range"),
    ({"ops": {"size": 10, "refill_time": 10, "one_time_burst": -1}},
     "drive[0].rate_limiter.ops.one_time_burst: -1 is out of range; allowed 0.."),
    ({"ops": {"size": 10, "refill_time": 10, "burst": 1}},
     "drive[0].rate_limiter.ops.burst: unknown key; the keys are size, one_time_burst, refill_time"),
])
def test_bad_rate_limiter_refused(files, limiter, error):
    path = files.write_json(drive_json(files, rate_limiter=limiter))
    result = stratovirt("-config", str(path), *files.base())
    assert result.error.startswith(error), result.error


def test_the_model_is_the_same_from_either_form(files):
    from vmm.config import ratelimit
    assert ratelimit.from_throttling({"iops-total": ("4000", "x")}) == \
        ratelimit.from_json({"ops": {"size": 400, "refill_time": 100}}, "y") == \
        RateLimit(ops=Bucket(400, 100))


def test_nic_throttling_in_both_forms_and_json(files):
    seed = printed(stratovirt(*files.base(), "-netdev", "id=n,netdev=tap0,throttling.rx-pps=100,"
                              "throttling.tx-bps=1000000,throttling.tx-bps-max=2000000",
                              "-print-config"))["net"][0]
    assert seed["rx_rate_limiter"] == {"ops": {"size": 10, "one_time_burst": 0, "refill_time": 100}}
    assert seed["tx_rate_limiter"] == {
        "bandwidth": {"size": 2000000, "one_time_burst": 0, "refill_time": 2000}}
    form2x = printed(stratovirt("-kernel", str(files.kernel), "-qmp", f"unix:{files.api},server,nowait",
                                "-netdev", "tap,id=n,ifname=tap0,throttling.rx-pps=100,"
                                "throttling.tx-bps=1000000,throttling.tx-bps-max=2000000",
                                "-device", "virtio-net-device,netdev=n,id=n", "-print-config"))
    assert form2x["net"][0] == seed
    path = files.write_json({"net": [seed]})
    assert printed(stratovirt("-config", str(path), *files.base(), "-print-config"))["net"] == [seed]


@pytest.mark.parametrize("props,error", [
    ("throttling.rx-pps=0", "-netdev[0].throttling.rx-pps: 0 is out of range"),
    ("throttling.tx-bps=x", '-netdev[0].throttling.tx-bps: "x" is not a whole number'),
    ("throttling.tx-bps-max=5", "-netdev[0].throttling.tx-bps-max: without throttling.tx-bps"),
    ("throttling.rx-iops=5", "-netdev[0].throttling.rx-iops: unknown property"),
])
def test_bad_nic_throttling_refused(files, props, error):
    result = stratovirt(*files.base(), "-netdev", f"id=n,netdev=tap0,{props}")
    assert result.error.startswith(error), result.error


def test_bad_nic_rate_limiter_refused(files):
    path = files.write_json({"net": [{"iface_id": "n", "host_dev_name": "tap0",
                                      "tx_rate_limiter": {"ops": {"size": 5}}}]})
    assert stratovirt("-config", str(path), *files.base()).error.startswith(
        "net[0].tx_rate_limiter.ops.refill_time: missing")
