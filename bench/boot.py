"""Start-up of the tiny guest: our stratovirt against QEMU's microvm on the same /dev/kvm,
run side by side, interleaved, medians and ratios.

    .venv/bin/python bench/boot.py [--runs N] [--rounds R] [--timeline] [--python PATH]

Each run starts one VM and measures, from the moment before the program is started:
- the first byte of the guest's serial output (its stdout);
- the api-channel answering: the socket is connected as soon as it exists, the QMP
  greeting read and `qmp_capabilities` answered (QEMU: `-qmp unix:PATH,server=on,
  wait=off`).
Ours runs with seccomp on, as it always is unless -disable-seccomp. Both boot the same
ELF (tests/framework/guest.py): ours through its 64-bit entry, QEMU through its PVH
note; each with `wait` on the command line, so the guest halts after printing; then
the VM is ended. A round is --runs runs of each, alternating; each round prints its
medians, and the last lines give the median of the rounds' medians and their spread
(min..max).

--timeline adds runs of ours at STRATOVIRT_LOG_LEVEL=debug with a log file and prints
the median time of each step of the start-up timeline (vmm/timeline.py) from the
program's start; those runs are not in the figures above (debug logging costs time).
--python runs ours with another interpreter (say, a venv with a non-editable install);
its `stratovirt` console script, beside it, is what is started.
"""

import argparse
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.framework.guest import tiny_guest  # noqa: E402

VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
DEADLINE = 30.0                  # seconds; a VM that says nothing by then fails the bench


class Started:
    """One launch: when the first serial byte came, when QMP answered (seconds from the
    launch), and the process."""

    def __init__(self, argv: list[str], api: str, env: dict | None = None):
        self.api = api
        self.start = time.monotonic()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env)
        self.serial = self.qmp = None
        self._wait()

    def _wait(self) -> None:
        client, greeted, buffer = None, False, b""
        out = self.process.stdout.fileno()
        while self.serial is None or self.qmp is None:
            if time.monotonic() - self.start > DEADLINE:
                self.end()
                raise RuntimeError(f"{self.process.args[0]}: nothing after {DEADLINE} s")
            if client is None and os.path.exists(self.api):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    client.connect(self.api)
                except OSError:
                    client.close()
                    client = None
            watched = [fd for fd, pending in ((out, self.serial is None),
                                              (client, client is not None and self.qmp is None))
                       if pending]
            # Until the socket exists, look for it every half millisecond.
            ready, _, _ = select.select(watched, [], [], 0.0005 if client is None else 1.0)
            if out in ready and self.serial is None:
                if not os.read(out, 1):
                    self.end()
                    raise RuntimeError(f"{self.process.args[0]}: its output ended")
                self.serial = time.monotonic() - self.start
            if client is not None and client in ready:
                data = client.recv(4096)
                if not data:
                    raise RuntimeError(f"{self.process.args[0]}: QMP closed the connection")
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if "QMP" in message and not greeted:
                        greeted = True
                        client.sendall(b'{"execute": "qmp_capabilities"}\n')
                    elif "return" in message:
                        self.qmp = time.monotonic() - self.start
        client.close()

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def ours_argv(stratovirt: str, kernel: Path, api: str, extra=()) -> list[str]:
    return [stratovirt, "-kernel", str(kernel), "-append", "wait", "-m", "128M",
            "-serial", "stdio", "-api-channel", f"unix:{api}", *extra]


def qemu_argv(kernel: Path, api: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm", "-m", "128M", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "wait", "-device", "isa-debug-exit",
            "-qmp", f"unix:{api},server=on,wait=off"]


def run_once(argv: list[str], api: str, env=None) -> tuple[float, float]:
    if os.path.exists(api):
        os.unlink(api)
    started = Started(argv, api, env)
    started.end()
    return started.serial, started.qmp


TIMELINE = re.compile(r"timeline: \+[\d.]+ ms (?P<step>.*) \(monotonic (?P<when>[\d.]+)\)$")


def timeline_once(stratovirt: str, kernel: Path, workdir: str, env: dict) -> dict[str, float]:
    """The steps of one debug-level launch, in ms from the program's start."""
    log, api = f"{workdir}/timeline.log", f"{workdir}/timeline.sock"
    if os.path.exists(log):
        os.unlink(log)
    env = dict(env, STRATOVIRT_LOG_LEVEL="debug")
    if os.path.exists(api):
        os.unlink(api)
    started = Started(ours_argv(stratovirt, kernel, api, ("-D", log)), api, env)
    started.end()
    steps = {"serial byte seen by the bench": started.serial * 1000,
             "QMP answered the bench": started.qmp * 1000}
    for line in Path(log).read_text().splitlines():
        match = TIMELINE.search(line)
        if match and match["step"] not in steps:
            steps[match["step"]] = (float(match["when"]) - started.start) * 1000
    return steps


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}..{max(values):.1f}"


SETUPS = ("ours", "ours-zygote", "qemu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10, help="runs of each per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--python", default=str(VENV_PYTHON))
    options = parser.parse_args()
    stratovirt = str(Path(options.python).parent / "stratovirt")
    kernel = tiny_guest()
    rounds = []
    with tempfile.TemporaryDirectory() as workdir, Zygote(options.python, workdir) as zygote:
        api = f"{workdir}/api.sock"
        launches = {
            "ours": lambda: run_once(ours_argv(stratovirt, kernel, api), api, zygote.without),
            "ours-zygote": lambda: run_once(ours_argv(stratovirt, kernel, api), api, zygote.env),
            "qemu": lambda: run_once(qemu_argv(kernel, api), api),
        }
        for launch in launches.values():                            # warm the caches
            launch()
        for number in range(options.rounds):
            results = {name: [] for name in SETUPS}
            for _ in range(options.runs):
                for name in SETUPS:
                    results[name].append(launches[name]())
            medians = {name: [statistics.median(r[i] for r in runs) * 1000 for i in (0, 1)]
                       for name, runs in results.items()}
            rounds.append(medians)
            print(f"round {number + 1}: " + "; ".join(
                f"{name} serial {m[0]:.1f} ms, api {m[1]:.1f} ms" for name, m in medians.items()),
                flush=True)
        print(f"{options.rounds} rounds of {options.runs} runs each, interleaved; medians "
              "of the rounds' medians (spread over the rounds); ratio = ours/QEMU")
        for index, what in enumerate(("launch -> first serial byte", "launch -> api-channel "
                                      "answering")):
            q = [r["qemu"][index] for r in rounds]
            print(f"{what}: QEMU {statistics.median(q):.1f} ms ({spread(q)})")
            for name in SETUPS[:2]:
                o = [r[name][index] for r in rounds]
                ratios = [a / b for a, b in zip(o, q)]
                print(f"  {name}: {statistics.median(o):.1f} ms ({spread(o)}), ratio "
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
        if options.timeline:
            for name, env in (("ours", zygote.without), ("ours-zygote", zygote.env)):
                runs = [timeline_once(stratovirt, kernel, workdir, env)
                        for _ in range(options.runs)]
                print(f"timeline of {name} at debug level (median of {options.runs} runs, ms "
                      "from the program's start):")
                steps = sorted({step for run in runs for step in run}, key=lambda step:
                               statistics.median(r[step] for r in runs if step in r))
                for step in steps:
                    values = [r[step] for r in runs if step in r]
                    print(f"  {statistics.median(values):7.1f}  {step}")


class Zygote:
    """A `stratovirt-zygote` for the bench's own runs (vmm/zygote/), on a socket of its
    own; `env` sends `stratovirt` to it, `without` keeps any zygote of the host's out."""

    def __init__(self, python: str, workdir: str):
        self.socket = f"{workdir}/zygote/zygote.sock"
        self.env = dict(os.environ, STRATOVIRT_ZYGOTE=self.socket)
        self.without = dict(os.environ, STRATOVIRT_ZYGOTE="")
        self.process = subprocess.Popen([str(Path(python).parent / "stratovirt-zygote"),
                                         "--socket", self.socket], stderr=subprocess.PIPE)

    def __enter__(self):
        line = self.process.stderr.readline().decode()
        if "ready on" not in line:
            raise RuntimeError(f"stratovirt-zygote: {line.strip() or 'ended'}")
        return self

    def __exit__(self, *_):
        self.process.terminate()
        self.process.wait(30)


if __name__ == "__main__":
    main()
