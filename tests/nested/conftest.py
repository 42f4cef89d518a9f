"""The nested suite: tests that run inside an L1 VM with a real /dev/kvm
(tests/framework/nested.py). Deselect them with `-m "not nested"`."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.framework.nested import NestedRig


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "nested: runs inside an L1 VM under QEMU TCG with nested SVM (~20 s a run)")


@pytest.fixture(scope="module")
def rig():
    """One rig per module: the base image is checked (built the first time) and the wheel
    is built once, then each run() boots a fresh L1."""
    with NestedRig() as rig:
        rig.base()
        yield rig


L1_DIR = pathlib.Path(__file__).parent / "l1"
FRAMEWORK = pathlib.Path(__file__).parents[1] / "framework"


@pytest.fixture(scope="session")
def qmp_wheel(tmp_path_factory) -> pathlib.Path:
    """qemu.qmp from PyPI, for the L1 scripts that drive QMP with the real client."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                    str(wheels), "qemu.qmp"], check=True)
    [wheel] = wheels.glob("qemu_qmp-*.whl")
    return wheel


@pytest.fixture(scope="session")
def boot_and_jailer_checks(qmp_wheel) -> dict:
    """One L1 boot shared by test_linux_boot.py and test_jailer.py (CI time: one boot
    fewer)."""
    with NestedRig() as rig:
        return run_checks(rig, "boot_checks.py", "jailer_checks.py", qmp_wheel=qmp_wheel,
                          timeout=1800)


def run_checks(rig, *scripts: str, qmp_wheel: pathlib.Path | None = None,
               files: dict[str, pathlib.Path] | None = None, timeout: int = 1200) -> dict:
    """Boot L1 once, run each tests/nested/l1/<script> there in turn (with qemu.qmp
    installed first when its wheel is given), and collect their `CHECK <name> <json>`
    lines: {name: [data, ...], "console": L1's console text, "why": what a failing test shows}."""
    files = {**{script: L1_DIR / script for script in scripts},
             "console.py": FRAMEWORK / "console.py", "l2_shell.py": L1_DIR / "l2_shell.py",
             **(files or {})}
    command = "; ".join(f"python3 {script}" for script in scripts)
    if qmp_wheel:
        files[qmp_wheel.name] = qmp_wheel
        command = f"pip install -q --no-index --no-deps {qmp_wheel.name} && {{ {command}; }}"
    result = rig.run(command, files=files, timeout=timeout)
    found, failures = {}, []
    for number, line in enumerate(result.output):
        if line.startswith("CHECK "):
            _, name, data = line.split(" ", 2)
            found.setdefault(name, []).append(json.loads(data))
        elif line.startswith("CHECK-FAILED"):
            failures.append("\n".join(result.output[max(0, number - 60):number + 1]))
    found["console"] = result.console
    found["why"] = explain(failures, result.console)
    return found


def explain(failures: list[str], console: str) -> str:
    """What a test shows when a check is missing: each CHECK-FAILED line with the output
    before it (the L2 console that led there), then L1's console tail."""
    parts = [f"--- check failed:\n{failure}" for failure in failures]
    return "\n".join(parts + ["--- L1 console, tail:\n" + console[-3000:]])
