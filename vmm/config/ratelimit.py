"""Rate limits as users write them, into one model.RateLimit (docs/limits.md).

Two forms, as the two communities write them:

- Firecracker's `rate_limiter` object in the JSON file (a drive's, a NIC's rx/tx):
  `{"bandwidth": {"size", "one_time_burst", "refill_time"}, "ops": {...}}`, sizes in
  bytes or requests, refill_time in ms. Kept as written.
- A NIC's `throttling.rx-bps=N`, `rx-pps=N` (frames per second) and the same for `tx`,
  each with `-max` and `-max-length` bursts, on -netdev: the disk's rules below, frames
  counted as requests are. The JSON file's net entries take `rx_rate_limiter` and
  `tx_rate_limiter`, Firecracker's names.
- QEMU's and StratoVirt 2.x's `throttling.*` properties of -drive (and QMP's
  block_set_io_throttle, which takes the same numbers): `iops-total=N` is a bucket of
  N/10 requests refilled in 100 ms -- N per second with QEMU's default burst of a
  tenth of a second -- or, where N/10 is not whole, the shortest refill time (whole
  ms, up to a second) in which N is a whole number of tokens: the rate is always exact,
  the burst between a tenth of a second's worth and a second's. `iops-total-max=M`
  (with `iops-total-max-length=L` seconds, default 1) makes the bucket M*L requests,
  refilled at N per second (the refill time rounded up to whole ms), so a burst of M*L
  may go at once. `bps-*` the same in bytes.

A limit of 0 is refused here (omit the limit instead); QMP's 0 means "no limit", as
in QEMU, and is handled by its caller. Every number is checked against the ranges
below, with the option or JSON path it came from in the message.
"""

import math

from .draft import Item, Setting
from .errors import ConfigError
from .model import Bucket, RateLimit
from .values import kind_of, parse_int

MAX_TOKENS = (1 << 63) - 1
REFILL_MS = (1, 3_600_000)                # at most an hour (native/ratelimit.h)
MAX_LENGTH_S = (1, 3600)
BUCKET_KEYS = ("size", "one_time_burst", "refill_time")
LIMITER_KEYS = ("bandwidth", "ops")
THROTTLING = ("iops-total", "bps-total", "iops-total-max", "bps-total-max",
              "iops-total-max-length", "bps-total-max-length")
NIC_THROTTLING = tuple(f"{direction}-{kind}{suffix}" for direction in ("rx", "tx")
                       for kind in ("bps", "pps") for suffix in ("", "-max", "-max-length"))


def _check(value: int, where: str, low: int, high: int, unit: str = "") -> int:
    if not low <= value <= high:
        raise ConfigError(where, f"{value}{unit} is out of range", f"allowed {low}..{high}"
                          + ("; omit the limit for none" if low == 1 and value == 0 else ""))
    return value


def _whole(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"is {kind_of(value)}", "a whole number is expected")
    return value


def bucket_from_json(value, where: str) -> Bucket:
    if not isinstance(value, dict):
        raise ConfigError(where, f"is {kind_of(value)}", f"an object with the keys {', '.join(BUCKET_KEYS)}")
    for key in value:
        if key not in BUCKET_KEYS:
            raise ConfigError(f"{where}.{key}", "unknown key", f"the keys are {', '.join(BUCKET_KEYS)}")
    if "size" not in value:
        raise ConfigError(f"{where}.size", "missing", "a bucket needs a size and a refill_time")
    size = _check(_whole(value["size"], f"{where}.size"), f"{where}.size", 1, MAX_TOKENS)
    if "refill_time" not in value:
        raise ConfigError(f"{where}.refill_time", "missing",
                          f"a bucket with a size needs a refill_time in ms, {REFILL_MS[0]}..{REFILL_MS[1]}")
    refill = _check(_whole(value["refill_time"], f"{where}.refill_time"), f"{where}.refill_time",
                    *REFILL_MS, " ms")
    burst = _check(_whole(value.get("one_time_burst", 0), f"{where}.one_time_burst"),
                   f"{where}.one_time_burst", 0, MAX_TOKENS)
    return Bucket(size, refill, burst)


def from_json(value, where: str) -> RateLimit:
    """A `rate_limiter` object."""
    if not isinstance(value, dict):
        raise ConfigError(where, f"is {kind_of(value)}",
                          f"an object with the keys {', '.join(LIMITER_KEYS)}")
    for key in value:
        if key not in LIMITER_KEYS:
            raise ConfigError(f"{where}.{key}", "unknown key", f"the keys are {', '.join(LIMITER_KEYS)}")
    if not value:
        raise ConfigError(where, "has no bucket", "give bandwidth, ops or both; omit it for no limit")
    return RateLimit(*(bucket_from_json(value[key], f"{where}.{key}") if key in value else None
                       for key in LIMITER_KEYS))


def to_json(limit: RateLimit) -> dict:
    return {key: {"size": bucket.size, "one_time_burst": bucket.one_time_burst,
                  "refill_time": bucket.refill_time}
            for key, bucket in (("bandwidth", limit.bandwidth), ("ops", limit.ops)) if bucket}


def rate_bucket(rate: int, burst: int | None, length: int | None) -> Bucket:
    """QEMU's average rate per second, with an optional burst rate for `length` s. Without
    a burst: the shortest refill time of at least 100 ms (a whole number of ms) in which
    the rate is a whole number of tokens, so the rate is exact."""
    if burst:
        size = burst * (length or 1)
        return Bucket(size, -(-size * 1000 // rate))
    step = 1000 // math.gcd(rate, 1000)            # refill times with whole tokens
    refill = step * -(-100 // step)
    return Bucket(rate * refill // 1000, refill)


def throttling_setting(item: Item) -> None:
    """Replaces a draft item's `throttling.*` fields (Settings of their text) by its
    rate-limit Settings: a drive's `rate_limit`, a NIC's `rx_rate_limit` and
    `tx_rate_limit`."""
    given = {name[len("throttling."):]: (setting.value, setting.where)
             for name, setting in item.fields.items() if name.startswith("throttling.")}
    for name in given:
        del item.fields[f"throttling.{name}"]
    where = f"{item.where}.throttling"
    if item.kind == "drive" and given:
        item.fields["rate_limit"] = Setting(from_throttling(given), where)
    elif item.kind == "nic":
        for direction, limit in nic_throttling(given).items():
            item.fields[f"{direction}_rate_limit"] = Setting(limit, where)


def from_throttling(given: dict[str, tuple[str, str]], prefix: str = "throttling.") -> RateLimit:
    """A disk's throttling.* properties: name -> (text, where written); messages name
    the properties as `prefix` + name (a backend program's options: "--")."""
    values = {name: _number(name, text, at) for name, (text, at) in given.items()}
    return from_rates(values, lambda name: given[name][1] if name in given else prefix + name)


def _number(name: str, text: str, where: str) -> int:
    return _check(parse_int(text, where), where,
                  *(MAX_LENGTH_S if name.endswith("length") else (1, MAX_TOKENS)))


def nic_throttling(given: dict[str, tuple[str, str]], prefix: str = "throttling.") -> dict:
    """A NIC's throttling.{rx,tx}-{bps,pps}[-max[-length]] -> {"rx": RateLimit, "tx": ...}
    for the directions given: pps counts frames as iops counts requests."""
    limits = {}
    for direction in ("rx", "tx"):
        mine = {name: value for name, value in given.items() if name.startswith(direction + "-")}
        if not mine:
            continue
        # rx-pps-max -> iops-total-max, the names from_rates reads.
        as_drive = {nic_to_drive(name): name for name in mine}
        values = {drive: _number(name, *mine[name]) for drive, name in as_drive.items()}
        limits[direction] = from_rates(values, lambda drive, d=direction, a=as_drive: (
            mine[a[drive]][1] if drive in a else prefix + _nic_name(d, drive)))
    return limits


def nic_to_drive(nic_name: str) -> str:
    """rx-pps-max -> iops-total-max: a NIC's names as from_rates reads them (QMP's
    rx_pps_max too)."""
    parts = nic_name.replace("_", "-").split("-")
    return "-".join([{"pps": "iops", "bps": "bps"}[parts[1]], "total", *parts[2:]])


def _nic_name(direction: str, drive_name: str) -> str:
    kind, rest = drive_name.split("-", 2)[0], drive_name.split("-", 2)[2:]
    return "-".join([direction, {"iops": "pps", "bps": "bps"}[kind], *rest])


def from_rates(values: dict[str, int], spell) -> RateLimit:
    """QEMU's numbers by their -drive names (`iops-total`, `bps-total-max`, ...; each
    already in range) -> RateLimit. spell(name): how the user wrote that name, for
    messages (an option, a property's path, a QMP parameter)."""
    buckets = {}
    for kind in ("iops", "bps"):
        avg, top, length = f"{kind}-total", f"{kind}-total-max", f"{kind}-total-max-length"
        rate, burst, seconds = values.get(avg), values.get(top), values.get(length)
        if rate is None:
            if burst is not None or seconds is not None:
                raise ConfigError(spell(top if burst is not None else length),
                                  f"without {spell(avg)}",
                                  f"a burst needs the average rate: give {spell(avg)}")
            continue
        if seconds is not None and burst is None:
            raise ConfigError(spell(length), f"without {spell(top)}",
                              f"the length is of a burst: give {spell(top)}")
        if burst is not None and burst < rate:
            raise ConfigError(spell(top), f"{burst} is below the average rate {rate}",
                              f"a burst rate is at least {spell(avg)}")
        bucket = rate_bucket(rate, burst, seconds)
        if bucket.size > MAX_TOKENS:
            raise ConfigError(spell(top), "the burst (max x max-length) is too large",
                              f"at most {MAX_TOKENS} {'requests' if kind == 'iops' else 'bytes'}")
        if bucket.refill_time > REFILL_MS[1]:
            raise ConfigError(spell(top), "the burst would take more than an hour to refill "
                              "at the average rate", "give a smaller burst or a shorter max-length")
        buckets["ops" if kind == "iops" else "bandwidth"] = bucket
    return RateLimit(**buckets)
