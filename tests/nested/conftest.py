"""The nested suite: tests that run inside an L1 VM with a real /dev/kvm
(tests/framework/nested.py). Deselect them with `-m "not nested"`."""

import json
import pathlib

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


def run_checks(rig, script: str, command: str | None = None,
               files: dict[str, pathlib.Path] | None = None, timeout: int = 1200) -> dict:
    """Boot L1 once, run tests/nested/l1/<script> there, and collect its
    `CHECK <name> <json>` lines: {name: [data, ...], "console": L1's console text}."""
    result = rig.run(command or f"python3 {script}",
                     files={script: L1_DIR / script, "console.py": FRAMEWORK / "console.py",
                            **(files or {})},
                     timeout=timeout)
    found = {}
    for line in result.output:
        if line.startswith("CHECK "):
            _, name, data = line.split(" ", 2)
            found.setdefault(name, []).append(json.loads(data))
    found["console"] = result.console
    return found
