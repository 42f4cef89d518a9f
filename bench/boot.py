"""Launch to first serial byte, and memory, of the tiny guest: our stratovirt against
QEMU's microvm on the same /dev/kvm, interleaved, medians reported with ratios.

    .venv/bin/python bench/boot.py [--runs N]

Both VMs boot the same ELF (tests/framework/guest.py): ours through its 64-bit entry,
QEMU through its PVH note. Each is started with `wait` on the command line, so it halts
after printing and stays up for the memory reading, then is ended. Memory: the summed
PSS of our processes (launcher + vm process) and QEMU's PSS and RSS, after boot.
"""

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.framework.guest import tiny_guest  # noqa: E402

VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"


def smaps_rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields


def descendants(pid: int) -> list[int]:
    found = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += descendants(int(child))
    return found


def first_byte(argv: list[str]) -> tuple[float, subprocess.Popen]:
    start = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    ready, _, _ = select.select([process.stdout], [], [], 30)
    if not ready or not os.read(process.stdout.fileno(), 1):
        process.kill()
        raise RuntimeError(f"no serial output from {argv[0]}")
    elapsed = time.monotonic() - start
    time.sleep(0.3)  # let the guest finish printing and settle
    return elapsed, process


def run_ours(kernel: Path, workdir: str) -> tuple[float, int, int]:
    api = f"{workdir}/api.sock"
    argv = [str(VENV_PYTHON), "-m", "vmm", "-kernel", str(kernel), "-append", "wait",
            "-m", "128M", "-serial", "stdio", "-api-channel", f"unix:{api}"]
    elapsed, process = first_byte(argv)
    pids = descendants(process.pid)
    pss = sum(smaps_rollup(pid)["Pss"] for pid in pids)
    rss = sum(smaps_rollup(pid)["Rss"] for pid in pids)
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    return elapsed, pss, rss


def run_qemu(kernel: Path) -> tuple[float, int, int]:
    argv = ["qemu-system-x86_64", "-M", "microvm,accel=kvm", "-m", "128M", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "wait", "-device", "isa-debug-exit"]
    elapsed, process = first_byte(argv)
    rollup = smaps_rollup(process.pid)
    process.kill()
    process.wait(30)
    return elapsed, rollup["Pss"], rollup["Rss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    kernel = tiny_guest()
    ours, qemu = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(runs):
            ours.append(run_ours(kernel, workdir))
            qemu.append(run_qemu(kernel))

    def median(results, index):
        return statistics.median(r[index] for r in results)

    o_time, q_time = median(ours, 0) * 1000, median(qemu, 0) * 1000
    o_pss, q_pss, q_rss = median(ours, 1) / 1024, median(qemu, 1) / 1024, median(qemu, 2) / 1024
    o_rss = median(ours, 2) / 1024
    print(f"runs: {runs} each, interleaved; medians")
    print(f"launch -> first serial byte: ours {o_time:.1f} ms, QEMU {q_time:.1f} ms, "
          f"ratio {o_time / q_time:.2f}")
    print(f"memory: ours PSS {o_pss:.1f} MiB (RSS {o_rss:.1f}), QEMU PSS {q_pss:.1f} MiB "
          f"(RSS {q_rss:.1f}); PSS ratio {o_pss / q_pss:.2f}, ours PSS / QEMU RSS "
          f"{o_pss / q_rss:.2f}")


if __name__ == "__main__":
    main()
