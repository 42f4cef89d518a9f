"""Runs inside L1: backends that come back (vmm/restart.py), seen by Debian's stock kernel
as L2. Prints `CHECK <name> <json>` lines for tests/nested/test_backend_restart.py.

VM 1 boots from the initramfs with a data disk (d0, /dev/vda in L2, O_DIRECT in L1), a
NIC on a tap (n0) and vsock (v0), and `-backend-restart restarts=100,window=1`: a death
more than a second after the previous one is restarted at once, so a kill's stall is
the restart's own, not the policy's backoff (VM 2 has the default policy). One vCPU:
with two, L2 triple-faulted or froze in 6 of 19 L1 runs of this rig (2026-12-02), as
often with no kill at all (3 of 6, once before any disk I/O), and never in 9 runs with
one (the requests in flight are the writers' processes', not its CPUs'). In order:

- disk_kills: four writers in L2 (O_DIRECT 64 KiB, 256 KiB and 1 MiB blocks; buffered
  256 KiB blocks with fsync, the device's page cache dropped before each read-back),
  each writing fresh random blocks round-robin into its own region, journaling every
  write that completed and reading it back against its md5; a probe writing a 4 KiB
  O_DIRECT block with a counter as fast as it can, logging L2's uptime at each
  completion. Meanwhile L1 kills vmm-blk-d0 fourteen times, SIGKILL ten times, then
  SIGSYS four times (the death a seccomp violation is), each once the device serves
  again: at a random moment, and every other time at the first moment after it that the
  backend holds a request it took and has not completed (queued in its io_uring, d0
  being O_DIRECT; or a thread in preadv/pwritev of 8 segments or more or fdatasync, as
  a buffered disk's would be), so that a request it took dies with it. Per kill: the counter in the
  image once the old process is dead (v0); kill to BACKEND_RESTARTED and to the first
  later probe write in the image (L1's clock); the restart's delay the launcher
  logged; the requests the new backend logged it resubmitted from the in-flight
  region; the guest's stall, the longer of the two gaps between the probe's
  completions around v0 (one of them spans the kill). At the end: the journals (per
  slot the last md5, as a digest) against the image as L1 reads it, read-back
  mismatches, failed writes, and L2's kernel log.
- nic_kills: 2 MiB over TCP each way at once (busybox nc in L2, L1's ends reading and
  writing slowly until the kills are done) while vmm-net-n0 is killed five times; both
  md5s, and the bytes each way had moved at every kill.
- vsock_kill: an idle guest -> L1 stream open (L1 sent "hello" on it) and a guest
  listener; vmm-vsock-v0 is killed: how the old stream ends on both sides, then a new
  guest -> L1 stream and an L1 -> guest one to the listener, with md5s, right after
  BACKEND_RESTARTED.
- vm1_end: query-block, the log's restart and violation lines, the guest's reboot -f.

VM 2 (restart_limit): the default policy (5 restarts in 60 s): its disk's backend killed
six times; BACKEND_RESTARTED five times, then BACKEND_FAILED, one log line, the VM still
running and its guest answering.

L1-side timings are L1's clock; the stall is L2's (/proc/uptime, 10 ms steps). Both run
under TCG, so they are this rig's figures, not a host's.
"""

import asyncio
import base64
import hashlib
import json
import mmap
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.qmp_client import ExecuteError

from console import Timeout, Vm
import l2_shell

KiB, MiB = 1024, 1 << 20
DIR = "/tmp/rs"
API = f"{DIR}/api.sock"
LOG = f"{DIR}/vm.log"
VSOCK = f"{DIR}/v0.vsock"            # <api-channel's directory>/<vsock id>.vsock
IMAGE = "/payload/files/d0.img"      # ext4: the backend's O_DIRECT works there
IMAGE_SIZE = 48 * MiB
APPEND = "console=ttyS0 reboot=k panic=1 quiet"
# name, kind, block size, region offset, region size
WRITERS = (("w0", "direct", 64 * KiB, 0, 8 * MiB),
           ("w1", "direct", 256 * KiB, 8 * MiB, 8 * MiB),
           ("w2", "direct", MiB, 16 * MiB, 16 * MiB),
           ("w3", "buffered", 256 * KiB, 32 * MiB, 8 * MiB))
PROBE_OFFSET = 40 * MiB
SIGKILLS, SIGSYSES = 10, 4
TAP, HOST_IP, GUEST_IP = "rt0", "10.0.30.1", "10.0.30.2"
NIC_KILLS = 5
TRANSFER = 2 * MiB
DIR2 = "/tmp/rs2"
COMMAND_SECONDS = 300
IMAGE2 = "/payload/files/d1.img"

# The writer: fresh random blocks, round-robin over its slots (in units of its block
# size), each written, journaled once the write completed, and read back.
WRITER = r"""
kind=$1 bs=$2 first=$3 slots=$4 me=$5
wflag= rflag=
if [ "$kind" = direct ]; then wflag=oflag=direct rflag=iflag=direct; fi
n=0 bad=0 errs=0
: > /j.$me
while [ -e /run.flag ]; do
    slot=$((first + n % slots))
    dd if=/dev/urandom of=/b.$me bs=$bs count=1 iflag=fullblock 2>/dev/null
    sum=$(md5sum < /b.$me); sum=${sum%% *}
    if out=$(dd if=/b.$me of=/dev/vda bs=$bs seek=$slot count=1 $wflag conv=notrunc,fsync 2>&1)
    then echo "$n $slot $sum" >> /j.$me
    else errs=$((errs + 1)); echo "$me $n write: $out" >> /errors
    fi
    if [ "$kind" = buffered ]; then busybox blockdev --flushbufs /dev/vda; fi
    got=$(dd if=/dev/vda bs=$bs skip=$slot count=1 $rflag 2>/dev/null | md5sum)
    if [ "${got%% *}" != "$sum" ]; then bad=$((bad + 1)); echo "$me $n read back" >> /errors; fi
    n=$((n + 1))
done
echo "$n $bad $errs" > /done.$me
"""

# The probe: a counter in one 4 KiB block, O_DIRECT, and the guest's uptime at each
# completion.
PROBE = r"""
slot=$1
n=0
: > /probe.log
while [ -e /run.flag ]; do
    n=$((n + 1))
    printf '%-4095s\n' "probe $n" > /pb
    if dd if=/pb of=/dev/vda bs=4096 seek=$slot count=1 oflag=direct conv=notrunc 2>/dev/null
    then read up idle < /proc/uptime; echo "$n $up" >> /probe.log
    else echo "$n err" >> /probe.log
    fi
done
echo "$n" > /done.probe
"""

# Waits run by the guest while the writers make it busy, kept short on the console
# (ash echoes a command line character by character): `started`, every journal has a
# line; `mark` then `grown`, every journal has more lines than at the mark. Up to 120 s
# of L2's time; prints yes or no.
HELPER = r"""
journals="$2"
case $1 in
started) check() { for f in $journals; do [ -s $f ] || return 1; done; } ;;
mark) for f in $journals; do busybox wc -l < $f > $f.mark; done; exit 0 ;;
grown) check() { for f in $journals; do
                     [ $(busybox wc -l < $f) -gt $(cat $f.mark) ] || return 1; done; } ;;
esac
i=0
until check; do [ $i -ge 1200 ] && break; sleep 0.1; i=$((i + 1)); done
if check; then echo yes; else echo no; fi
"""

KERNEL_TROUBLE = re.compile(r"I/O error|blk_update_request|Buffer I/O error|blocked for more "
                            r"than|not a head|virtqueue|broken|timed out|call trace", re.I)


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


class Guest(l2_shell.Guest):
    """L2's shell (tests/nested/l1/l2_shell.py), each command bounded by COMMAND_SECONDS,
    and what this script does with it besides."""

    def __init__(self, vm: Vm, prefix: str):
        super().__init__(vm, prefix, COMMAND_SECONDS)

    async def put(self, path: str, text: str) -> None:
        """A file in L2, through the console in pieces short enough for ash's line
        editor (1 KiB a line)."""
        encoded = base64.b64encode(text.encode()).decode()
        await self.run(f"busybox rm -f {path}.b64")
        for at in range(0, len(encoded), 600):
            await self.run(f"echo -n {encoded[at:at + 600]} >> {path}.b64")
        await self.run(f"busybox base64 -d {path}.b64 > {path}")
        got = (await self.value(f"md5sum < {path}")).split()[0]
        if got != hashlib.md5(text.encode()).hexdigest():
            raise ValueError(f"{path} arrived damaged in L2")

    async def wait_for(self, condition: str, tries: int = 600) -> bool:
        """Poll a shell condition every 0.1 s (L2's time)."""
        value = await self.value(f"i=0; until {condition}; do [ $i -ge {tries} ] && break; "
                                 "sleep 0.1; i=$((i+1)); done; "
                                 f"if {condition}; then echo yes; else echo no; fi")
        return value == "yes"


class Qmp:
    """qemu.qmp with every event kept as it arrives (L1's monotonic time, name, data)."""

    def __init__(self, client: QMPClient):
        self.client = client
        self.listener = EventListener()
        client.register_listener(self.listener)
        self.events: list[tuple[float, str, dict]] = []
        self.changed = asyncio.Event()
        self.taken = 0
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self):
        while True:
            event = await self.listener.get()
            self.events.append((time.monotonic(), event["event"], event.get("data", {})))
            self.changed.set()

    async def __call__(self, command: str, args: dict | None = None) -> dict:
        try:
            return {"ok": True, "return": await self.client.execute(command, args)}
        except ExecuteError as error:
            return {"ok": False, "error": error.received.get("error")}

    async def event(self, name: str, device: str, timeout: float):
        """The next event `name` about `device` not taken yet: (time, data), or None."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self.taken, len(self.events)):
                when, found, data = self.events[index]
                if found == name and data.get("device") == device:
                    self.taken = index + 1
                    return when, data
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return None

    def named(self, *names: str) -> list[list]:
        return [[name, data] for _, name, data in self.events if name in names]


def live(name: str) -> int | None:
    """The pid of the live (not zombie) process called `name`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == name and state != "Z":
            return int(pid)
    return None


def gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def status_of(pid: int) -> dict:
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)
            if k in ("Seccomp", "Seccomp_filters", "NoNewPrivs", "CapEff")}


# A disk backend's request in progress (x86_64 numbers). A buffered disk's requests run
# inline: preadv and pwritev of 8 segments or more (the writes of 64 KiB and up, long
# enough that the kill comes before the syscall returns), fdatasync (a FLUSH). An
# O_DIRECT disk's (d0's) run in its io_uring: entries the backend queued and has not
# reaped (its fdinfo: SqTail, the backend's, ahead of CqHead, the backend's too, which
# it advances only after it has put those requests in the used ring). That is looked at
# with the backend stopped (SIGSTOP), so that what was held at the look is still held
# when the kill comes: a look at a running backend lost the race to its reaping (a CI
# run had 0 resubmitted after 'ring' catches).
VECTORED, FDATASYNC = {"295", "296"}, "75"


class Requests:
    """Whether backend `pid` holds a request it took and has not completed, read from
    /proc fast: its threads' current syscalls, its io_urings' fdinfo."""

    def __init__(self, pid: int):
        self.pid, self.fds, self.rings = pid, [], []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                self.fds.append(os.open(f"/proc/{pid}/task/{tid}/syscall", os.O_RDONLY))
        except OSError:
            pass

    def find_rings(self):
        """The rings appear once the frontend has started the queues: looked for until
        one is there."""
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                if os.readlink(f"/proc/{self.pid}/fd/{fd}") == "anon_inode:[io_uring]":
                    self.rings.append(f"/proc/{self.pid}/fdinfo/{fd}")
        except OSError:
            pass

    def in_syscall(self) -> bool:
        for fd in self.fds:
            try:
                words = os.pread(fd, 128, 0).split()
            except OSError:
                continue
            if words and (words[0] == FDATASYNC.encode() or
                          (words[0].decode() in VECTORED and int(words[3], 16) >= 8)):
                return True
        return False

    def in_ring(self) -> bool:
        if not self.rings:
            self.find_rings()
        for path in self.rings:
            try:
                with open(path) as f:
                    info = dict(line.split(":", 1) for line in f if ":" in line)
                if (int(info["SqTail"]) - int(info["CqHead"])) % (1 << 32):
                    return True
            except (OSError, KeyError, ValueError):
                continue
        return False

    def stopped(self, within: float) -> bool:
        """Whether every thread of the backend is stopped (a group stop ends a thread's
        disk syscall first), waiting up to `within` seconds."""
        until = time.monotonic() + within
        while time.monotonic() < until:
            try:
                states = [open(f"/proc/{self.pid}/task/{tid}/stat").read().rpartition(")")[2]
                          .split()[0] for tid in os.listdir(f"/proc/{self.pid}/task")]
            except OSError:
                return False
            if all(state in "tTZ" for state in states):
                return True
        return False

    def held(self) -> str | None:
        """Where a request is held, or None: "syscall" (looked at while it runs, so
        that the kill comes before the syscall returns), or "ring" (looked at, and
        left, stopped: the caller kills it, then sends SIGCONT)."""
        if self.in_syscall():
            return "syscall"
        _signal(self.pid, signal.SIGSTOP)
        if self.stopped(0.5) and self.in_ring():
            return "ring"
        _signal(self.pid, signal.SIGCONT)
        time.sleep(0.002)                   # L1 has one CPU: let it run before the next look
        return None

    def close(self):
        for fd in self.fds:
            os.close(fd)


def _signal(pid: int, number: int) -> None:
    """A stop or continue for a backend that may have died meanwhile."""
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


async def kill(name: str, number: int, old: int | None = None, in_request: float = 0) -> dict:
    """Kill the live process `name` (not `old`, the one killed before) and wait until it
    is dead (a zombie or reaped): its pid and the L1 time of the kill. With `in_request`,
    wait up to that many seconds for a moment it holds a disk request it took and has
    not completed (Requests: in its syscall, or queued in its io_uring while it is
    stopped), and say where one was held, if one was."""
    deadline = time.monotonic() + 60
    while (pid := live(name)) is None or pid == old:
        if time.monotonic() > deadline:
            raise Timeout(f"no new {name} process")
        await asyncio.sleep(0.01)
    caught = None
    if in_request:
        requests = Requests(pid)
        until = time.monotonic() + in_request
        while not (caught := requests.held()) and time.monotonic() < until:
            pass
    os.kill(pid, number)
    if caught == "ring" and number != signal.SIGKILL:
        _signal(pid, signal.SIGCONT)        # a handled signal (SIGSYS) needs it to run
    if in_request:
        requests.close()
    at = time.monotonic()
    while not gone(pid):
        time.sleep(0.001)
    return {"pid": pid, "at": at, "dead": time.monotonic() - at, "in_request": caught}


class Probe:
    """Reads the probe's counter from the image, O_DIRECT (past L1's page cache)."""

    def __init__(self):
        self.fd = os.open(IMAGE, os.O_RDONLY | os.O_DIRECT)
        self.buffer = mmap.mmap(-1, 4096)

    def counter(self) -> int:
        os.preadv(self.fd, [self.buffer], PROBE_OFFSET)
        words = bytes(self.buffer[:32]).split()
        return int(words[1]) if len(words) > 1 and words[0] == b"probe" else 0

    async def beyond(self, value: int, timeout: float = 60) -> float | None:
        """Poll until the counter is past `value`: the L1 time it was seen, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.counter() > value:
                return time.monotonic()
            await asyncio.sleep(0.005)
        return None


def restart_delays(device: str) -> list[float]:
    """The delay the launcher logged for each restart of `device`, in order."""
    delays = []
    for line in open(LOG).read().splitlines():
        if "restarting it" in line and re.search(rf"\b{device}\b", line):
            found = re.search(r"restarting it in ([\d.]+) s", line)
            delays.append(float(found[1]) if found else 0.0)
    return delays


def resubmitted(pid: int | None) -> int:
    """The requests backend `pid` logged it resubmitted from the in-flight region."""
    total = 0
    for line in open(LOG).read().splitlines():
        found = re.search(r"\[(\d+)\].*ring \d+: (\d+) requests a previous backend left in "
                          "flight are resubmitted", line)
        if found and int(found[1]) == pid:
            total += int(found[2])
    return total


def md5_at(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(length)).hexdigest()


async def disk_kills(guest: Guest, qmp: Qmp, rng: random.Random) -> None:
    await guest.put("/w.sh", WRITER)
    await guest.put("/p.sh", PROBE)
    await guest.put("/h.sh", HELPER)
    await guest.run("busybox dmesg -c > /dev/null; busybox rm -f /errors /done.*; "
                    ": > /run.flag")
    # The writers and the probe a little less favoured than the shell, so that the
    # console still answers while they keep the one vCPU busy.
    for name, kind, bs, offset, size in WRITERS:
        await guest.run(f"sh /w.sh {kind} {bs} {offset // bs} {size // bs} {name} "
                        "</dev/null >/dev/null 2>&1 & busybox renice -n 5 -p $! >/dev/null")
    await guest.run(f"sh /p.sh {PROBE_OFFSET // 4096} </dev/null >/dev/null 2>&1 & "
                    "busybox renice -n 5 -p $! >/dev/null")
    journals = " ".join(f"/j.{name}" for name, *_ in WRITERS)
    started = await guest.value(f"sh /h.sh started '{journals}'") == "yes"
    probe = Probe()
    kills = []
    plan = [signal.SIGKILL] * SIGKILLS + [signal.SIGSYS] * SIGSYSES
    old = None
    previous = time.monotonic()
    for index, number in enumerate(plan):
        # More than the policy's window (1 s) after the previous death, so that each
        # restart is at once; a random moment of the writers' I/O all the same, and
        # every other kill the first moment after it that the backend is in a request.
        await asyncio.sleep(max(0.0, previous + 1.2 - time.monotonic()) + rng.uniform(0, 0.8))
        killed = await kill("vmm-blk-d0", number, old, in_request=3.0 if index % 2 else 0)
        previous = killed["at"] + killed["dead"]
        old = killed["pid"]
        v0 = probe.counter()
        event = await qmp.event("BACKEND_RESTARTED", "d0", 60)
        served = await probe.beyond(v0)
        new = live("vmm-blk-d0")
        entry = {"signal": signal.Signals(number).name, "pid": killed["pid"], "v0": v0,
                 "in_request": killed["in_request"],
                 "dead_s": round(killed["dead"], 4),
                 "event": event[1] if event else None,
                 "to_event_s": round(event[0] - killed["at"], 3) if event else None,
                 "to_served_s": round(served - killed["at"], 3) if served else None,
                 "new_pid": new}
        kills.append(entry)
        if not event or not served:
            break
    # Every writer completes a round after the last kill, then all stop.
    after = await guest.value(f"sh /h.sh mark '{journals}'; "
                              f"sh /h.sh grown '{journals}'") == "yes"
    await guest.run("busybox rm /run.flag; wait")
    done = {}
    for name in [w[0] for w in WRITERS] + ["probe"]:
        done[name] = (await guest.value(f"cat /done.{name}")).split()
    errors, _ = await guest.run("busybox head -n 20 /errors 2>/dev/null")
    kernel, _ = await guest.run("busybox dmesg")

    # The journals against the image as L1 reads it.
    writers = {}
    for name, kind, bs, offset, size in WRITERS:
        written, distinct, digest = (await guest.value(
            f"d=$(busybox awk '{{last[$2]=$3}} END {{for (s in last) print s, last[s]}}' "
            f"/j.{name} | busybox sort -n | md5sum); "
            f"echo $(busybox wc -l < /j.{name}) "
            f"$(busybox awk '!($2 in s) {{s[$2]=1; c++}} END {{print c+0}}' /j.{name}) "
            "${d%% *}")).split()
        first = offset // bs
        listing = "".join(f"{slot} {md5_at(IMAGE, slot * bs, bs)}\n"
                          for slot in range(first, first + int(distinct)))
        entry = {"kind": kind, "block": bs, "written": int(written),
                 "slots": int(distinct), "region_slots": size // bs, "guest": digest,
                 "host": hashlib.md5(listing.encode()).hexdigest()}
        if entry["guest"] != entry["host"]:
            guest_list, _ = await guest.run(
                f"busybox awk '{{last[$2]=$3}} END {{for (s in last) print s, last[s]}}' "
                f"/j.{name} | busybox sort -n")
            entry["differ"] = sorted(set(guest_list) ^ set(listing.splitlines()))[:20]
        entry["rounds"], entry["bad"], entry["errors"] = (int(x) for x in done[name])
        writers[name] = entry

    # The guest's stall at each kill: the probe's completions around v0.
    wanted = " ".join(str(k["v0"]) for k in kills)
    lines, _ = await guest.run(
        f"busybox awk -v ks='{wanted}' 'function at(i) {{return (i in t) ? t[i] : 0}} "
        "BEGIN {n = split(ks, a, \" \")} $2 != \"err\" {t[$1] = $2} "
        "END {for (i = 1; i <= n; i++) {k = a[i]; print k, at(k-1), at(k), at(k+1)}}' "
        "/probe.log")
    around = [line.split() for line in lines if len(line.split()) == 4]
    for entry, (k, before, at, next_) in zip(kills, around):
        before, at, next_ = float(before), float(at), float(next_)
        gaps = [g for g in (at - before if before and at else None,
                            next_ - at if at and next_ else None) if g is not None]
        entry["stall_s"] = round(max(gaps), 3) if gaps else None
    stats = (await guest.value(
        "busybox awk '$2 != \"err\" {if (p != \"\") print $2 - p; p = $2}' /probe.log | "
        "busybox sort -n | busybox awk '{a[NR] = $1} END {print NR, a[int((NR+1)/2)], "
        "a[NR]}'")).split()
    delays = restart_delays("d0")
    for entry, delay in zip(kills, delays):
        entry["delay_s"] = delay
    for entry in kills:
        # What the new backend found in the in-flight region and resubmitted.
        entry["resubmitted"] = resubmitted(entry["new_pid"])
    stalls = [k["stall_s"] for k in kills if k.get("stall_s") is not None]
    beyond = [k["stall_s"] - k.get("delay_s", 0) for k in kills if k.get("stall_s") is not None]
    pid = live("vmm-blk-d0")
    report("disk_kills", kills=kills, started=started, after_last_kill=after,
           writers=writers, probe_rounds=int(done["probe"][0]), errors=errors,
           kernel=kernel, kernel_trouble=[line for line in kernel if KERNEL_TROUBLE.search(line)],
           probe_gaps={"count": int(stats[0]), "median_s": float(stats[1]),
                       "max_s": float(stats[2])} if len(stats) == 3 else stats,
           stall={"median_s": median(stalls), "max_s": max(stalls) if stalls else None,
                  "beyond_delay_median_s": round(median(beyond), 3) if beyond else None},
           to_event_median_s=median([k["to_event_s"] for k in kills if k["to_event_s"]]),
           to_served_median_s=median([k["to_served_s"] for k in kills if k["to_served_s"]]),
           delays=delays, backend=status_of(pid) if pid else None)


class Slow(threading.Thread):
    """One TCP connection on L1's side: receive to the end (data None) or send `data`;
    8 KiB every 0.1 s until `fast` is set, then as fast as it goes. `moved` counts."""

    def __init__(self, port: int, fast: threading.Event, data: bytes | None = None):
        super().__init__(daemon=True)
        self.listener = socket.create_server((HOST_IP, port))
        self.listener.settimeout(300)
        self.fast, self.data = fast, data
        self.moved = 0
        self.digest = hashlib.md5()
        self.error = None
        self.start()

    def run(self):
        try:
            connection, _ = self.listener.accept()
            connection.settimeout(300)
            with connection:
                if self.data is None:
                    while chunk := connection.recv(65536 if self.fast.is_set() else 8192):
                        self.digest.update(chunk)
                        self.moved += len(chunk)
                        if not self.fast.is_set():
                            time.sleep(0.1)
                else:
                    while self.moved < len(self.data):
                        size = len(self.data) - self.moved if self.fast.is_set() else 8192
                        connection.sendall(self.data[self.moved:self.moved + size])
                        self.moved += min(size, len(self.data) - self.moved)
                        if not self.fast.is_set():
                            time.sleep(0.1)
        except OSError as error:
            self.error = repr(error)
        finally:
            self.listener.close()


async def nic_kills(guest: Guest, qmp: Qmp, rng: random.Random) -> None:
    await guest.run(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0")
    _, ping = await guest.run(f"ping -c 2 -W 10 {HOST_IP}")
    sent = (await guest.value(f"dd if=/dev/urandom of=/out bs=65536 count={TRANSFER >> 16} "
                              "2>/dev/null; md5sum < /out")).split()[0]
    fast = threading.Event()
    data = os.urandom(TRANSFER)
    upload, download = Slow(7000, fast), Slow(7001, fast, data)
    await guest.run(f"busybox rm -f /nc.*; (nc {HOST_IP} 7000 < /out; echo $? > /nc.out) "
                    f"</dev/null >/dev/null 2>&1 & (nc {HOST_IP} 7001 < /dev/null > /in; "
                    "echo $? > /nc.in) </dev/null >/dev/null 2>&1 & true")
    deadline = time.monotonic() + 120
    while (upload.moved < 64 * KiB or download.moved < 64 * KiB) and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    kills, old = [], None
    for _ in range(NIC_KILLS):
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        killed = await kill("vmm-net-n0", signal.SIGKILL, old)
        old = killed["pid"]
        moved = {"out": upload.moved, "in": download.moved}
        event = await qmp.event("BACKEND_RESTARTED", "n0", 60)
        kills.append({"moved": moved, "event": event[1] if event else None,
                      "to_event_s": round(event[0] - killed["at"], 3) if event else None})
        if not event:
            break
    fast.set()
    await asyncio.to_thread(upload.join, 300)
    await asyncio.to_thread(download.join, 300)
    finished = await guest.wait_for("[ -e /nc.out ] && [ -e /nc.in ]", tries=1200)
    status = await guest.value("echo $(cat /nc.out /nc.in)")
    got = (await guest.value("md5sum < /in")).split()[0]
    _, ping_after = await guest.run(f"ping -c 2 -W 10 {HOST_IP}")
    report("nic_kills", ping=ping, kills=kills, finished=finished, nc_status=status.split(),
           out={"guest": sent, "host": upload.digest.hexdigest(), "bytes": upload.moved,
                "error": upload.error},
           inward={"guest": got, "host": hashlib.md5(data).hexdigest(),
                   "bytes": download.moved, "error": download.error},
           total=TRANSFER, ping_after=ping_after, carrier=await guest.value(
               "cat /sys/class/net/eth0/carrier"))


def vsock_server(port: int, found: dict, greet: bytes = b"", reply: bool = False):
    """<vsock socket>_<port>: accept one stream, send `greet`, read it to its end (how
    it ended: 'eof' or the error), answer the md5 of what came if `reply`."""
    path = f"{VSOCK}_{port}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(300)

    def serve():
        try:
            conn, _ = listener.accept()
            found["accepted"] = time.monotonic()
            conn.settimeout(300)
            if greet:
                conn.sendall(greet)
            data = b""
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                found["end"] = "eof"
            except OSError as error:
                found["end"] = repr(error)
            found["ended"] = time.monotonic()
            found["md5"] = hashlib.md5(data).hexdigest()
            if reply:
                conn.sendall(found["md5"].encode() + b"\n")
            conn.close()
        except OSError as error:
            found["error"] = repr(error)
        finally:
            listener.close()
            os.unlink(path)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def vsock_client(port: int, payload: bytes, found: dict) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(120)
    try:
        sock.connect(VSOCK)
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                break
            line += byte
        found["line"] = line.decode(errors="replace").strip()
        if line.startswith(b"OK "):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError as error:
        found["error"] = repr(error)
    finally:
        sock.close()


async def vsock_kill(guest: Guest, qmp: Qmp) -> None:
    old_host: dict = {}
    server = vsock_server(5000, old_host, greet=b"hello\n")
    # The stream's stdin stays open (sleep), so only the stream's end can end it.
    await guest.run("busybox rm -f /vs.*; (busybox sleep 600 | { vsock-io connect 2 5000 "
                    "> /vs.out 2> /vs.err; echo $? > /vs.status; }) </dev/null >/dev/null "
                    "2>&1 & true")
    greeted = await guest.wait_for("busybox grep -q hello /vs.out 2>/dev/null")
    await guest.run("(vsock-io listen 6000 < /dev/null > /vs.q; echo $? > /vs.qstatus) "
                    "</dev/null >/dev/null 2>&1 & true")
    _, made = await guest.run("dd if=/dev/urandom of=/vs.p bs=65536 count=4 2>/dev/null")
    sent = (await guest.value("md5sum < /vs.p")).split()[0]
    new_host: dict = {}
    new_server = vsock_server(5001, new_host, reply=True)
    killed = await kill("vmm-vsock-v0", signal.SIGKILL)
    event = await qmp.event("BACKEND_RESTARTED", "v0", 60)
    # At once: a new guest -> L1 stream, then an L1 -> guest one to the listener.
    start = time.monotonic()
    lines, new_status = await guest.run("vsock-io connect 2 5001 < /vs.p")
    new_seconds = time.monotonic() - start
    payload = os.urandom(300_000)
    into: dict = {}
    await asyncio.to_thread(vsock_client, 6000, payload, into)
    got = await guest.wait_for("[ -e /vs.qstatus ]", tries=300)
    into_guest = (await guest.value("md5sum < /vs.q")).split()[0]
    ended = await guest.wait_for("[ -e /vs.status ]", tries=300)
    old_status = await guest.value("cat /vs.status 2>/dev/null")
    old_error = await guest.value("cat /vs.err 2>/dev/null")
    await asyncio.to_thread(server.join, 30)
    await asyncio.to_thread(new_server.join, 30)
    report("vsock_kill", greeted=greeted, event=event[1] if event else None,
           to_event_s=round(event[0] - killed["at"], 3) if event else None,
           old={"ended": ended, "status": old_status, "error": old_error,
                "host_end": old_host.get("end"),
                "host_after_kill_s": round(old_host["ended"] - killed["at"], 3)
                if "ended" in old_host else None},
           new={"status": new_status, "reply": lines[-1].strip() if lines else "",
                "sent": sent, "host": new_host.get("md5"), "seconds": round(new_seconds, 2)},
           into={"line": into.get("line"), "error": into.get("error"), "done": got,
                 "host": hashlib.md5(payload).hexdigest(), "guest": into_guest})


def dump_log(path: str, count: int = 80) -> None:
    """The log's last lines on L1's console, for a step that failed."""
    if os.path.exists(path):
        for line in open(path).read().splitlines()[-count:]:
            print("VMLOG|", line, flush=True)


def log_lines(path: str, *needles: str) -> list[str]:
    text = open(path).read() if os.path.exists(path) else ""
    return [line for line in text.splitlines() if any(n in line for n in needles)]


async def vm1() -> None:
    os.makedirs(DIR, exist_ok=True)
    with open(IMAGE, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run("modprobe", "tun")
    run("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
    run("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
    run("ip", "link", "set", TAP, "up")
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", APPEND, "-smp", "1", "-m", "512M", "-serial", "stdio",
             "-api-channel", f"unix:{API}", "-drive", f"file={IMAGE},id=d0",
             "-netdev", f"id=n0,netdev={TAP}", "-device", "vsock,id=v0,guest-cid=3",
             "-D", LOG, "-backend-restart", "restarts=100,window=1"], timeout=600)
    timings = {"seed": seed}
    try:
        start = time.monotonic()
        await asyncio.to_thread(vm.expect, "initramfs: ready")
        timings["boot"] = round(time.monotonic() - start, 2)
        guest = Guest(vm, "RS")
        client = QMPClient("restart")
        await client.connect(API)
        qmp = Qmp(client)
        for name, step in (("disk_kills", lambda: disk_kills(guest, qmp, rng)),
                           ("nic_kills", lambda: nic_kills(guest, qmp, rng)),
                           ("vsock_kill", lambda: vsock_kill(guest, qmp))):
            start = time.monotonic()
            try:
                await step()
            except Exception as error:      # the other steps may still tell something
                print("CHECK-FAILED", name, repr(error), flush=True)
                dump_log(LOG)
            timings[name] = round(time.monotonic() - start, 2)
        block = await qmp("query-block")
        events = qmp.named("BACKEND_RESTARTED", "BACKEND_FAILED")
        vm.send("reboot -f\n")
        status = await asyncio.to_thread(vm.wait)
        try:
            await client.disconnect()
        except Exception:        # the VM is gone: the connection ended with it
            pass
        report("vm1_end", query_block=block, events=events, status=status,
               restarting=log_lines(LOG, "restarting it"),
               violations=log_lines(LOG, "seccomp violation: "),
               resubmitted=log_lines(LOG, "are resubmitted"),
               failed=log_lines(LOG, "no longer works"),
               errors=[line for line in log_lines(LOG, " :ERROR: ")][-10:],
               left=sorted(os.listdir(DIR)), backends=[live(n) for n in
                                                       ("vmm-blk-d0", "vmm-net-n0")])
        report("timings", **timings)
    finally:
        vm.kill()


async def vm2() -> None:
    """The default policy: the sixth death within 60 s fails the device."""
    os.makedirs(DIR2, exist_ok=True)
    with open(IMAGE2, "wb") as f:
        f.truncate(MiB)
    api, log = f"{DIR2}/api.sock", f"{DIR2}/vm.log"
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", APPEND, "-smp", "1", "-m", "256M", "-serial", "stdio",
             "-api-channel", f"unix:{api}", "-drive", f"file={IMAGE2},id=d1", "-D", log],
            timeout=600)
    try:
        await asyncio.to_thread(vm.expect, "initramfs: ready")
        guest = Guest(vm, "RL")
        size = await guest.value("cat /sys/block/vda/size")
        client = QMPClient("limit")
        await client.connect(api)
        qmp = Qmp(client)
        restarted, old = [], None
        for _ in range(5):
            killed = await kill("vmm-blk-d1", signal.SIGKILL, old)
            old = killed["pid"]
            event = await qmp.event("BACKEND_RESTARTED", "d1", 60)
            restarted.append(event[1] if event else None)
        await kill("vmm-blk-d1", signal.SIGKILL, old)
        failed = await qmp.event("BACKEND_FAILED", "d1", 60)
        await asyncio.sleep(1.0)                # a restart would have come by now
        left = live("vmm-blk-d1")
        status = await qmp("query-status")
        block = await qmp("query-block")
        alive = await guest.value("echo alive-$((6 * 7))")
        vm.send("reboot -f\n")
        ended = await asyncio.to_thread(vm.wait)
        try:
            await client.disconnect()
        except Exception:
            pass
        report("restart_limit", size=size, restarted=restarted,
               failed=failed[1] if failed else None, backend_left=left,
               query_status=status, query_block=block, guest=alive, status=ended,
               failed_lines=log_lines(log, "no longer works"),
               restarting=log_lines(log, "restarting it"),
               events=qmp.named("BACKEND_RESTARTED", "BACKEND_FAILED"))
    finally:
        vm.kill()


if __name__ == "__main__":
    failures = 0
    for scenario in (vm1, vm2):
        try:
            asyncio.run(scenario())
        except (Timeout, OSError, subprocess.SubprocessError, ValueError) as error:
            print("CHECK-FAILED", scenario.__name__, repr(error), flush=True)
            failures += 1
    sys.exit(failures)
