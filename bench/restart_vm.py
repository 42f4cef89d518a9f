"""A backend killed under a running VM until its device is reconnected to a new one,
through the real launcher and vm process: our stratovirt on this host's /dev/kvm with
the tiny guest, a disk (or another device) and a QMP client.

    .venv/bin/python bench/restart_vm.py [--kills N] [--device disk|nic|console|vsock]

Each of N kills (default 50): SIGKILL to the device's backend process, then the time
until the client receives BACKEND_RESTARTED. That span holds what a restart costs on
the host: the launcher seeing the death on the backend's pidfd, forking a new backend
from the kept recipe and confining it (under the launcher's filter, then its own), the
control message to the vm process, and the vm process's vhost-user handshake with the
new backend (features, configuration space, memory table) before the event is sent.
The tiny guest does not drive the device, so the rings' restart (a handful of messages
more) is not in it; bench/restart.py measures a backend serving its ring again with the
host-side driver. Kills are spaced a little over the policy's window (this VM runs with
`-backend-restart restarts=100,window=1`), so each restart is a first one, at once.
No QEMU figure: QEMU restarts no vhost-user backend itself.
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.framework.guest import tiny_guest  # noqa: E402
from tests.framework.microvm import Microvm  # noqa: E402
from tests.framework.qmp import session  # noqa: E402

PROCESS = {"disk": "vmm-blk-d0", "nic": "vmm-net-n0", "console": "vmm-con-c0",
           "vsock": "vmm-vsock-v0"}


def device_args(workdir: Path, device: str) -> list[str]:
    if device == "disk":
        (workdir / "d0.img").write_bytes(bytes(4 << 20))
        return ["-drive", f"file={workdir / 'd0.img'},id=d0"]
    if device == "nic":
        return ["-netdev", "id=n0,netdev=vmmbench0"]
    if device == "console":
        return ["-chardev", f"id=c0,path={workdir / 'con.sock'}"]
    return ["-device", "vsock,id=v0,guest-cid=3"]


def backend_pid(vm: Microvm, name: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in vm.children():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    return pid
            except OSError:
                pass
        time.sleep(0.005)
    raise SystemExit(f"no backend {name}")


def measure(vm: Microvm, name: str, kills: int) -> list[float]:
    async def steps(client, events):
        spans = []
        for _ in range(kills):
            pid = backend_pid(vm, name)
            events.seen.clear()
            start = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while not any(e["event"] == "BACKEND_RESTARTED" for e in events.seen):
                await asyncio.sleep(0.0005)
            spans.append(time.perf_counter() - start)
            await asyncio.sleep(1.1)          # past the window: the next one is a first
        return spans
    return session(vm.api, steps, timeout=kills * 5 + 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--device", choices=sorted(PROCESS), default="disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        workdir = Path(tmp)
        prefix = []
        if args.device == "nic":
            subprocess.run(["ip", "netns", "add", "vmmbench"], check=True)
            subprocess.run(["ip", "-n", "vmmbench", "tuntap", "add", "dev", "vmmbench0",
                            "mode", "tap", "vnet_hdr"], check=True)
            prefix = ["ip", "netns", "exec", "vmmbench"]
        vm = Microvm(workdir, tiny_guest(), *device_args(workdir, args.device),
                     "-backend-restart", "restarts=100,window=1", append="wait")
        vm.argv = [*prefix, *vm.argv]
        try:
            vm.spawn().wait_for_api()
            spans = sorted(measure(vm, PROCESS[args.device], args.kills))
        finally:
            vm.kill()
            if prefix:
                subprocess.run(["ip", "netns", "del", "vmmbench"], check=False)
    ms = [s * 1000 for s in spans]
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    print(f"{args.device}: kill -> BACKEND_RESTARTED over {len(ms)} kills: median "
          f"{statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, min {ms[0]:.1f}, max {ms[-1]:.1f}")


if __name__ == "__main__":
    main()
