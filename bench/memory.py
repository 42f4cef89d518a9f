"""Memory per VM: N tiny-guest VMs with one disk each, ours against QEMU's microvm with a
virtio-blk disk, side by side, summed PSS of every process and PSS per process role.

    .venv/bin/python bench/memory.py [--counts 1,10,50] [--rounds R] [--python PATH]

A round starts N VMs of ours, waits until each has printed its first serial byte and
answers on its api-channel, lets them settle, reads /proc/PID/smaps_rollup of every
process of every VM (ours: the launcher, the vm process and the disk's backend; QEMU:
its one process), ends them, then does the same with QEMU; for each N in turn. PSS
shares each page among the processes that map it, so the sum over all processes is
the memory the N VMs take together; divided by N it is the memory per VM. Ours runs
with seccomp on. Each VM has its own 64 MiB sparse image (ours refuses to share a
writable one). The last lines give, per N, the median over the rounds and the spread.
"""

import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.boot import VENV_PYTHON, Started, Zygote, ours_argv, qemu_argv, spread  # noqa: E402
from tests.framework.guest import tiny_guest  # noqa: E402

SETTLE = 1.0          # seconds after the last VM is up, before reading


def smaps_rollup(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f.read().splitlines()[1:]:
            name, value, *_ = line.split()
            fields[name.rstrip(":")] = int(value)
    return fields


def tree(pid: int) -> list[int]:
    found = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                found += tree(int(child))
    return found


def role_of(pid: int, top: int, zygote: int | None) -> str:
    with open(f"/proc/{pid}/comm") as f:
        name = f.read().strip()
    if pid == top:
        return "qemu" if name.startswith("qemu") else (
            "stratovirt (zygote's client)" if zygote else "launcher")
    if pid == zygote:
        return "zygote"
    if name == "stratovirt":
        return "launcher"
    for prefix, role in (("vmm-vm", "vm"), ("vmm-blk-", "disk backend"),
                         ("vmm-net-", "NIC backend"), ("vmm-con-", "console backend"),
                         ("vmm-vsock-", "vsock backend")):
        if name.startswith(prefix):
            return role
    return name


def measure(argvs: list[tuple[list[str], str]], env: dict | None = None,
            zygote: int | None = None) -> tuple[float, dict[str, float]]:
    """Start every VM, read the PSS of all their processes; (total KiB, KiB per role).
    Through a zygote, a VM's processes are its `stratovirt` and the zygote's child
    (with its own children); the zygote itself counts too, once for all of them."""
    started = []
    try:
        for argv, api in argvs:
            started.append(Started(argv, api, env))
        time.sleep(SETTLE)
        total, roles = 0, collections.defaultdict(list)
        groups = [(vm.process.pid, tree(vm.process.pid)) for vm in started]
        if zygote:
            groups.append((None, tree(zygote)))
        for top, pids in groups:
            for pid in pids:
                pss = smaps_rollup(pid)["Pss"]
                total += pss
                roles[role_of(pid, top, zygote)].append(pss)
        return total, {role: statistics.mean(values) for role, values in roles.items()}
    finally:
        for vm in started:
            if vm.process.poll() is None:
                vm.process.send_signal(signal.SIGTERM)
        for vm in started:
            try:
                vm.process.wait(60)
            except subprocess.TimeoutExpired:
                vm.process.kill()
                vm.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="1,10,50")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", default=str(VENV_PYTHON))
    options = parser.parse_args()
    counts = [int(n) for n in options.counts.split(",")]
    stratovirt = str(Path(options.python).parent / "stratovirt")
    kernel = tiny_guest()
    sides = ("ours", "ours-zygote", "qemu")
    results = {n: {key: [] for side in sides for key in (side, f"{side} roles")} for n in counts}
    with tempfile.TemporaryDirectory() as workdir, Zygote(options.python, workdir) as zygote:
        disks = []
        for index in range(max(counts)):
            disk = f"{workdir}/disk{index}.img"
            with open(disk, "wb") as f:
                f.truncate(64 << 20)
            disks.append(disk)

        def ours(n):
            return [(ours_argv(stratovirt, kernel, f"{workdir}/o{i}.sock",
                               ("-drive", f"id=d0,file={disks[i]}")), f"{workdir}/o{i}.sock")
                    for i in range(n)]

        def qemu(n):
            return [(qemu_argv(kernel, f"{workdir}/q{i}.sock") +
                     ["-drive", f"file={disks[i]},if=none,id=d0,format=raw",
                      "-device", "virtio-blk-device,drive=d0"], f"{workdir}/q{i}.sock")
                    for i in range(n)]

        for number in range(options.rounds):
            for n in counts:
                for side, argvs, env, zygote_pid in (
                        ("ours", ours(n), zygote.without, None),
                        ("ours-zygote", ours(n), zygote.env, zygote.process.pid),
                        ("qemu", qemu(n), None, None)):
                    for _, api in argvs:
                        if os.path.exists(api):
                            os.unlink(api)
                    total, roles = measure(argvs, env, zygote_pid)
                    results[n][side].append(total / n / 1024)
                    results[n][f"{side} roles"].append(roles)
                o, z, q = (results[n][side][-1] for side in sides)
                print(f"round {number + 1}, {n} VMs: per VM ours {o:.2f} MiB (ratio {o / q:.2f}),"
                      f" through the zygote {z:.2f} MiB (ratio {z / q:.2f}), QEMU {q:.2f} MiB",
                      flush=True)
    print(f"{options.rounds} rounds, interleaved; summed PSS per VM, median (spread)")
    for n in counts:
        q = results[n]["qemu"]
        print(f"{n} VMs: QEMU {statistics.median(q):.2f} MiB ({spread(q)})")
        for side in sides:
            o = results[n][side]
            ratios = [a / b for a, b in zip(o, q)]
            per_role = collections.defaultdict(list)
            for roles in results[n][f"{side} roles"]:
                for role, kib in roles.items():
                    per_role[role].append(kib / 1024)
            print(f"  {side}: {statistics.median(o):.2f} MiB ({spread(o)}), ratio "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f}); "
                  "PSS per process: " + ", ".join(
                      f"{role} {statistics.median(v):.2f}" for role, v in per_role.items()))


if __name__ == "__main__":
    main()
