"""The nested suite: tests that run inside an L1 VM with a real /dev/kvm
(tests/framework/nested.py). Deselect them with `-m "not nested"`."""

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
