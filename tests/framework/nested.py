"""Run a shell scenario inside an L1 Linux that has a real /dev/kvm.

Why: this host's /dev/kvm is PVM and cannot run a stock Linux guest. QEMU's software
emulator (TCG) with `-cpu max,+svm` runs an L1 Debian whose kvm-amd gives a real /dev/kvm,
so our VMM can boot Debian's stock kernel as L2 inside L1 (../shared/docs/host.md, "way 3").
Python is slow under TCG: use this for correctness, never for timings.

    with NestedRig() as rig:
        result = rig.run("stratovirt --version", files={"vm.json": path})
        assert result.status == 0, result.console

Each run:
- makes sure the cached base image exists (scripts/build-l1.sh: Debian bookworm, python3,
  qemu-system-x86, a venv /opt/vmm with the runtime dependencies);
- builds the project wheel from the working tree (once per NestedRig), with the host's
  /usr/bin/python3, which is bookworm's 3.11.2;
- writes a per-run "payload" ext4 disk and boots L1 on QEMU TCG (q35, `-cpu max,+svm`) with
  the base image `snapshot=on` (runs never change it) and the payload disk.

What the scenario sees inside L1 (as root, run with `sh`, stdin /dev/null, stderr merged
into stdout):
- `stratovirt` and `python3` from /opt/vmm/bin first on PATH: the wheel was just
  `pip install --no-deps --no-index`-ed there; /dev/kvm with kvm-amd loaded.
- the `files` given to run() at /payload/files/<name>, which is also the working directory;
  the payload disk is a per-run copy, so the scenario may change them.
- the L2 guest from scripts/guest-assets.sh, always: /l2/vmlinuz (Debian's cloud kernel,
  bzImage), /l2/vmlinux (the same kernel as an ELF vmlinux), /l2/initrd.img (busybox initramfs), /l2/rootfs.ext4 (per-run writable copy).
- tools: busybox, iproute2, kmod (the L1 kernel's modules, e.g. `modprobe tun`), e2fsprogs
  (`debugfs -R 'cat /f' disk.img` reads what a guest wrote), qemu-system-x86_64.

Console protocol (L1's ttyS0, read on the host): the scenario's output sits between the lines
`NESTED-SCENARIO-BEGIN` and `NESTED-SCENARIO-END status=N`; while it runs, L1's kernel
messages are kept off the console (all but KERN_EMERG: panics, soft lockups) and printed
afterwards between `NESTED-KMSG-BEGIN` and `NESTED-KMSG-END`, and a `NESTED-ALIVE` line comes
every 20 s from a shell loop. A failure before the scenario prints `NESTED-SETUP-FAILED: why`.

When L1 itself breaks, the run is made once more, in a fresh L1 (host.md, "Seen in the
nested rig"): L1's kvm-amd under QEMU's emulated SVM now and then overflows the kernel
stack of one of our vCPU threads ("BUG: TASK stack guard page was hit", "corrupted stack
end detected inside scheduler"), resets L1 without a word (QEMU exits 0 mid-scenario, as a
triple fault does), or freezes L1 outright; the same happens with the tree as it was before
hot-plug, so it is the emulator's, not ours. "L1 broke" means: QEMU exited before the
scenario's end (our init powers off only after it), or the console fell silent (no
heartbeat) for STALL_SECONDS. A scenario that fails, or that runs past its timeout while L1
is alive, is never rerun; nor is a setup failure. Each rerun is printed (`nested: L1 broke
...; rerunning once`) and kept in `NestedResult.reruns`, so a run that needed one says so.

One L1 CPU (NESTED_L1_CPUS overrides it): with two, under QEMU 7.2's multi-threaded TCG,
L2 now and then triple-faulted or froze with nothing of ours to show for it, one vCPU as
well as two, with and without backend kills. A trace (NESTED_KTRACE=1) of one such triple
fault: L2 re-entered after an MMIO exit in its virtio_mmio interrupt handler, and the
fetch of the very next instruction, on the page it had just run from, took a not-present
#PF whose delivery faulted in turn; a mapping the guest had used a microsecond before
was gone, which is L1's nested paging as the emulator keeps it coherent across its vCPU
threads, not anything a VMM in L1 controls. In the whole nested suite, L1 with two CPUs:
one L2 triple fault, one L2 freeze and one L1 reset in one run of 20 min (and, in the
last session, 2 of 3 clean-clone CI runs failed this way); with one CPU: 2 runs of 48
tests, nothing broke, in 15 and 12 min (cross-CPU TLB flushes, which MTTCG serialises
by stopping every vCPU, are gone too). QEMU itself as the L2 VMM, under an L2 disk
workload of four O_DIRECT loops for 90 s, survived 6 of 6 runs with two L1 CPUs (3 with
its own virtio-blk, 3 with our vhost-user backend), as ours did 3 of 3: the failure is
rare per L2 boot and shows under the whole suite's churn, so that A/B neither convicts
nor clears anyone. If it comes back with one CPU, that is news: NESTED_KTRACE=1 catches it.
"""

import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[2]

BEGIN = "NESTED-SCENARIO-BEGIN"
# Not anchored at the start: a scenario whose output does not end in a newline shares its
# last line with the marker.
END = re.compile(r"NESTED-SCENARIO-END status=(\d+)$")
SETUP_FAILED = "NESTED-SETUP-FAILED"
ALIVE = "NESTED-ALIVE"
# L1 prints a heartbeat every 20 s and boots in ~15 s; a console this long silent is a frozen
# L1 (the checks' own waits print a CHECK-FAILED line well before their scenario's timeout).
STALL_SECONDS = 150

# PID 1 of L1 once /sbin/l1-init (in the base image) has mounted /proc, /sys, /dev, /tmp,
# /run and the payload at /payload. It lives on the payload so changing it needs no rebuild.
INIT = """\
fail() { echo "NESTED-SETUP-FAILED: $*"; sync; busybox poweroff -f; }
echo "nested: L1 up after $(cut -d' ' -f1 /proc/uptime) s; installing the project wheel"
/opt/vmm/bin/pip install -q --no-deps --no-index --disable-pip-version-check \\
    /payload/wheels/*.whl || fail "pip install of the project wheel"
modprobe kvm_amd || fail "modprobe kvm_amd"
echo "nested: ready after $(cut -d' ' -f1 /proc/uptime) s"
ln -s /payload/l2 /l2
export PATH=/opt/vmm/bin:$PATH PAYLOAD=/payload
cd /payload/files
seen=$(dmesg | wc -l)
KTRACE=
#KTRACE-SETUP#
dmesg -n 1
(while sleep 20; do echo NESTED-ALIVE; done) &
alive=$!
echo NESTED-SCENARIO-BEGIN
sh /payload/scenario.sh </dev/null 2>&1
echo "NESTED-SCENARIO-END status=$?"
kill $alive
dmesg -n 7
echo NESTED-KMSG-BEGIN
dmesg | tail -n +$((seen + 1))
echo NESTED-KMSG-END
if [ -n "$KTRACE" ] && [ "$(cat $KTRACE/tracing_on)" = 0 ]; then
    echo NESTED-KTRACE-BEGIN
    tail -n 600 $KTRACE/trace
    echo NESTED-KTRACE-END
fi
sync
busybox poweroff -f
"""

# Debugging an L2 that triple-faults (NESTED_KTRACE=1): L1's KVM tracepoints record every
# exit, IPI and injected event; the first SVM shutdown exit (0x7f) stops the trace, and its
# last lines are printed after the scenario. Why a trace: on a shutdown intercept kvm-amd
# re-initialises the VMCB, so registers read after KVM_EXIT_SHUTDOWN are the reset state;
# the trace has the faulting rip and the exits that led up to it.
KTRACE_SETUP = """\
KTRACE=/sys/kernel/tracing
mount -t tracefs nodev $KTRACE 2>/dev/null
echo 16384 > $KTRACE/buffer_size_kb
for event in kvm_exit kvm_inj_exception kvm_inj_virq kvm_apic_ipi kvm_apic_accept_irq \\
             kvm_userspace_exit kvm_msr kvm_cr; do
    echo 1 > $KTRACE/events/kvm/$event/enable
done
echo 'traceoff if exit_reason == 127' > $KTRACE/events/kvm/kvm_exit/trigger
"""


class NestedError(Exception):
    """L1 did not run the scenario to its end; the message ends with the console's tail."""


class NestedTimeout(NestedError):
    pass


class L1Broke(NestedError):
    """L1's kernel panicked or L1 froze: the emulator's failure, worth one rerun."""


@dataclass
class NestedResult:
    status: int                 # the scenario's exit status
    output: list[str]           # its lines (stdout and stderr), without kernel messages
    console: str                # everything L1 printed, for diagnostics
    kernel_log: list[str]       # L1's kernel messages while the scenario ran
    boot_seconds: float         # QEMU launch to NESTED-SCENARIO-BEGIN
    scenario_seconds: float     # BEGIN to END
    total_seconds: float        # QEMU launch to QEMU exit
    reruns: list[str] = field(default_factory=list)   # why earlier L1s of this run broke

    @property
    def text(self) -> str:
        return "\n".join(self.output)


@dataclass
class NestedRig:
    memory_mib: int = 2048
    cpus: int = int(os.environ.get("NESTED_L1_CPUS", "1"))     # see "One L1 CPU" above
    echo: bool = True           # print the console as it arrives; pytest shows it on failure
    _tmp: pathlib.Path | None = field(default=None, init=False, repr=False)
    _wheel: pathlib.Path | None = field(default=None, init=False, repr=False)
    _base: pathlib.Path | None = field(default=None, init=False, repr=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self._wheel = None

    def base(self) -> pathlib.Path:
        """The cached base (l1.img, vmlinuz, initrd.img), built on first use."""
        if self._base is None:
            proc = subprocess.run([REPO / "scripts/build-l1.sh"], stdout=subprocess.PIPE,
                                  text=True, check=True)
            self._base = pathlib.Path(proc.stdout.splitlines()[-1])
        return self._base

    def wheel(self) -> pathlib.Path:
        """The project wheel, built from a copy of the working tree's files as git sees them
        (tracked and untracked, not ignored), so stale build/ output never gets in."""
        if self._wheel is None:
            src = self._tmpdir() / "src"
            listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                      "--exclude-standard"], cwd=REPO, check=True,
                                     stdout=subprocess.PIPE, text=True).stdout
            for name in filter(None, listing.split("\0")):
                if (REPO / name).is_file():
                    (src / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / name, src / name)
            out = self._tmpdir() / "wheel"
            subprocess.run(["/usr/bin/python3", "-m", "pip", "wheel", "-q", "--no-deps",
                            "--disable-pip-version-check", "-w", out, src],
                           check=True, stdout=subprocess.DEVNULL)
            (self._wheel,) = out.glob("*.whl")
            shutil.rmtree(src)
        return self._wheel

    def run(self, scenario: str, files: dict[str, pathlib.Path] | None = None,
            timeout: float = 900) -> NestedResult:
        """Run `scenario` (shell) in a fresh L1 and return what it printed and its status;
        if that L1 breaks, once more in another (see the module docstring)."""
        try:
            return self._run_once(scenario, files or {}, timeout)
        except L1Broke as broke:
            first = str(broke)
            print(f"nested: L1 broke ({first.splitlines()[0]}); rerunning once", flush=True)
        result = self._run_once(scenario, files or {}, timeout)
        result.reruns.append(first)
        return result

    def _run_once(self, scenario, files, timeout) -> NestedResult:
        base, wheel = self.base(), self.wheel()
        run_dir = pathlib.Path(tempfile.mkdtemp(prefix="run-", dir=self._tmpdir()))
        try:
            payload = self._payload(run_dir, scenario, wheel, files)
            return self._boot(base, payload, timeout)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _tmpdir(self) -> pathlib.Path:
        if self._tmp is None:
            self._tmp = pathlib.Path(tempfile.mkdtemp(prefix="nested-"))
        return self._tmp

    def _payload(self, run_dir, scenario, wheel, files) -> pathlib.Path:
        tree = run_dir / "payload"
        for sub in ("wheels", "files", "l2"):
            (tree / sub).mkdir(parents=True)
        init = INIT
        if os.environ.get("NESTED_KMSG"):
            # Debugging: L1's kernel messages stay on the console while the scenario runs
            # (a soft lockup's backtrace, say), interleaved with its output.
            init = init.replace("dmesg -n 1\n", "dmesg -n 8\n")
        if os.environ.get("NESTED_KTRACE"):
            init = init.replace("#KTRACE-SETUP#", KTRACE_SETUP)
        (tree / "init.sh").write_text(init)
        (tree / "scenario.sh").write_text(scenario if scenario.endswith("\n") else scenario + "\n")
        _place(wheel, tree / "wheels" / wheel.name)
        for name, path in files.items():
            where = pathlib.PurePosixPath(name)
            if where.is_absolute() or ".." in where.parts:
                raise ValueError(f"file name {name!r} must be relative, without '..'")
            _place(pathlib.Path(path), tree / "files" / name)
        for name in ("vmlinuz", "vmlinux", "initrd.img", "rootfs.ext4"):
            _place(_guest_asset(name), tree / "l2" / name)
        size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        image = run_dir / "payload.img"
        with open(image, "wb") as f:
            f.truncate(size + size // 4 + (64 << 20))     # sparse; room for what L1 writes
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "payload", "-d", tree, image],
                       check=True)
        shutil.rmtree(tree)
        return image

    def _boot(self, base, payload, timeout) -> NestedResult:
        cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi",
               "-cpu", "max,+svm", "-smp", str(self.cpus), "-m", str(self.memory_mib),
               "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
               "-no-reboot",
               "-kernel", base / "vmlinuz", "-initrd", base / "initrd.img",
               # no_timer_check: under TCG on a loaded host the IO-APIC timer test can
               # miss its ticks and L1 panics ("IO-APIC + timer doesn't work").
               "-append", "console=ttyS0 reboot=k panic=1 quiet no_timer_check",
               # vda: the base image (writes go to a throw-away overlay); vdb: the payload
               "-drive", f"id=root,file={base / 'l1.img'},format=raw,if=none,snapshot=on",
               "-device", "virtio-blk-pci,drive=root,addr=4",
               "-drive", f"id=payload,file={payload},format=raw,if=none",
               "-device", "virtio-blk-pci,drive=payload,addr=5"]
        lines: list[tuple[float, str]] = []
        start = time.monotonic()
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        reader = threading.Thread(target=self._read, args=(qemu.stdout, lines, start))
        reader.start()
        try:
            self._wait(qemu, lines, start, timeout)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
            reader.join()
            qemu.stdout.close()
        total = time.monotonic() - start
        return _parse(lines, total, qemu.returncode)

    @staticmethod
    def _wait(qemu, lines, start, timeout):
        """Until QEMU exits; raises on the overall timeout or on a silent console."""
        while True:
            try:
                qemu.wait(5)
                return
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic() - start
            if now > timeout:
                raise NestedTimeout(f"L1 did not finish within {timeout:.0f} s" + _tail(lines))
            last = lines[-1][0] if lines else 0.0
            if now - last > STALL_SECONDS:
                raise L1Broke(f"L1's console silent for {now - last:.0f} s (frozen)"
                              + _tail(lines))

    def _read(self, stream, lines, start):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append((time.monotonic() - start, line))
            if self.echo and line != ALIVE:
                print(f"[L1 {lines[-1][0]:7.2f}s] {line}", flush=True)


def _parse(lines, total, qemu_status) -> NestedResult:
    lines = [(when, text) for when, text in lines if text != ALIVE]
    texts = [text for _, text in lines]
    failed = [text for text in texts if text.startswith(SETUP_FAILED)]
    if failed:
        raise NestedError(failed[0] + _tail(lines))
    try:
        begin = texts.index(BEGIN)
        end = next(i for i in range(begin + 1, len(texts)) if END.search(texts[i]))
    except (ValueError, StopIteration):
        raise L1Broke(f"L1 ended before the scenario did (QEMU exit status {qemu_status})"
                      + _tail(lines)) from None
    marker = END.search(texts[end])
    output = texts[begin + 1:end] + ([texts[end][:marker.start()]] if marker.start() else [])
    kmsg = texts[end + 1:]
    if "NESTED-KMSG-BEGIN" in kmsg and "NESTED-KMSG-END" in kmsg:
        kmsg = kmsg[kmsg.index("NESTED-KMSG-BEGIN") + 1:kmsg.index("NESTED-KMSG-END")]
    return NestedResult(status=int(marker.group(1)), output=output, console="\n".join(texts),
                        kernel_log=kmsg, boot_seconds=lines[begin][0],
                        scenario_seconds=lines[end][0] - lines[begin][0],
                        total_seconds=total)


def _tail(lines, count=40) -> str:
    return "\n--- L1 console, last lines:\n" + "\n".join(text for _, text in lines[-count:])


def _place(source: pathlib.Path, dest: pathlib.Path):
    """Hard-link (no copy of big disk images) where possible, else copy; mkfs.ext4 -d reads
    the file and the payload disk gets its own copy either way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, dest)


def _link_or_copy(source, dest):
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _guest_asset(name: str) -> pathlib.Path:
    """The L2 guest from scripts/guest-assets.sh, built if missing or out of date."""
    from tests.framework.assets import guest_assets
    return guest_assets() / name
