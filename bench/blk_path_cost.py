"""What the disk data path's counters and rate limiter cost per request (issue 14's "under
3%"), on the real C code with nothing around it: bench/blk_path_cost.c, compiled here
with -O2 against native/blkio.c, virtq.c and ratelimit.c, runs 4 KiB reads from a file
in /dev/shm (the page cache: the cheapest request, so the relative cost is the largest)
through blk_pump as a buffered disk's worker runs them (8 a pass), the four setups taking
turns in slices of 4096 requests:

    none      no counters, no limiter
    counters  the per-queue struct blk_stats every backend keeps
    page      counters and a limiter whose page sets no limit (the launcher's default)
    limited   counters and a limit far above the load (10^9 IOPS, 10^12 bytes/s)

    flock /tmp/stratovirt-bench.lock .venv/bin/python bench/blk_path_cost.py [--rounds 15]

Prints ns per request (wall and thread CPU) per setup, and the ratios to `none` as the
median of the per-round ratios with their spread. bench/blk.py measures the same through
a whole backend (vhost-user, kicks, interrupts), where noise between rounds is larger
than the cost.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("none", "counters", "page", "limited")
DISK_BYTES = 64 << 20


def build(directory: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("blk_path_cost: gcc is missing (scripts/setup.sh installs it)")
    binary = directory / "blk_path_cost"
    native = ROOT / "native"
    subprocess.run([gcc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{native}",
                    str(ROOT / "bench" / "blk_path_cost.c"), str(native / "blkio.c"),
                    str(native / "virtq.c"), str(native / "ratelimit.c"), "-luring",
                    "-o", str(binary)], check=True)
    return binary


def run(rounds: int, requests: int) -> dict[str, list[tuple[float, float]]]:
    """setup -> [(wall ns, cpu ns) per request, one per round]."""
    with tempfile.TemporaryDirectory() as work, \
            tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="blk-path-cost-") as disk:
        binary = build(Path(work))
        chunk = 1 << 20
        for _ in range(DISK_BYTES // chunk):
            disk.write(bytes(range(256)) * (chunk // 256))
        disk.flush()
        out = subprocess.run([str(binary), disk.name, str(rounds), str(requests)],
                             capture_output=True, text=True, check=True).stdout
    results: dict[str, list[tuple[float, float]]] = {setup: [] for setup in SETUPS}
    for line in out.splitlines():
        _, setup, wall, cpu = line.split()
        results[setup].append((float(wall), float(cpu)))
    return results


def ratio(results, setup: str, base: str, which: int) -> str:
    per_round = [a[which] / b[which] for a, b in zip(results[setup], results[base])]
    return (f"{statistics.median(per_round):.3f} "
            f"[{min(per_round):.3f}-{max(per_round):.3f}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=400_000,
                        help="requests per setup and round")
    args = parser.parse_args()
    results = run(args.rounds, args.requests)
    print(f"{args.rounds} rounds of {args.requests} 4 KiB reads per setup (page cache)\n")
    print("| setup | ns/request | CPU ns/request | / none | CPU / none |")
    print("|---|---:|---:|---:|---:|")
    for setup in SETUPS:
        wall = statistics.median(w for w, _ in results[setup])
        cpu = statistics.median(c for _, c in results[setup])
        shown = ("1", "1") if setup == "none" else \
            (ratio(results, setup, "none", 0), ratio(results, setup, "none", 1))
        print(f"| {setup} | {wall:.0f} | {cpu:.0f} | {shown[0]} | {shown[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
