"""What a backend's empty root (vmm/sandbox/empty_root.py) costs its start: disk backends
forked and confined as the launcher does it (vmm.children.spawn + serve_disk, the
virtio-blk filter), timed from the fork to the backend's first vhost-user reply
(GET_FEATURES, which it reads only once confined), with the empty root and, for
comparison, with its enter() replaced by nothing. Needs root.

    sudo .venv/bin/python bench/empty_root.py [--runs N]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework import disk_backend  # noqa: E402
from vmm import sandbox  # noqa: E402
from vmm.sandbox import empty_root  # noqa: E402
from vmm.vhost_user import protocol as P  # noqa: E402


def start_times(image: Path, runs: int) -> list[float]:
    """Milliseconds from fork to the first reply, per backend."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        child, connection = disk_backend.spawn(image)
        connection.send(P.GET_FEATURES)
        connection.receive()
        times.append((time.perf_counter() - t0) * 1000)
        connection.close()
        child.reap(block=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    sandbox.prepare()               # as the launcher has done before it forks backends
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "d.img"
        image.write_bytes(bytes(1 << 20))
        start_times(image, 5)       # warm up
        results = {}
        enter = empty_root.enter
        for label in ("empty root", "without", "empty root ", "without "):
            empty_root.enter = enter if label.startswith("empty") else (lambda reach=None: None)
            results[label] = start_times(image, args.runs)
        empty_root.enter = enter
    for label, times in results.items():
        times.sort()
        print(f"{label.strip():10}  median {statistics.median(times):6.2f} ms  "
              f"p90 {times[int(len(times) * 0.9)]:6.2f} ms  (n={len(times)})")


if __name__ == "__main__":
    main()
