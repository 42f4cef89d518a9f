"""native/virtq.c under AddressSanitizer and UBSan: tests/native/virtq_asan.c feeds it
hostile and random rings in malloc'ed guest RAM, where ASan's redzones catch any access
outside RAM that the Python tests' guard pages might not (reads inside the process's
other memory, a stray byte past a region)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-g", "-O1"]
SANITIZER_ERRORS = ("ERROR: AddressSanitizer", "runtime error")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup.sh installs it)")
    binary = tmp_path_factory.mktemp("virtq-asan") / "virtq_asan"
    build = subprocess.run(
        [gcc, *FLAGS, f"-I{ROOT / 'native'}", str(ROOT / "tests/native/virtq_asan.c"),
         str(ROOT / "native/virtq.c"), "-o", str(binary)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return binary


def run(binary, *args):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([str(binary), *args], capture_output=True, text=True,
                            timeout=300, env=env)
    return result.returncode, result.stdout + result.stderr


def test_hostile_and_random_rings_under_asan_and_ubsan(driver):
    status, output = run(driver)
    assert status == 0, output
    assert not any(error in output for error in SANITIZER_ERRORS), output
    # It did exercise all outcomes, not exit early.
    assert "100000 iterations" in output, output
    counts = {name: int(count) for count, name in re.findall(r"(\d+) (\w+)", output)}
    assert all(counts[name] > 1000 for name in ("chains", "broken", "empty")), output


def test_this_build_catches_an_overflow(driver):
    # The same build reading one byte past guest RAM on purpose must be stopped, or the
    # test above proves nothing.
    status, output = run(driver, "overflow")
    assert status != 0
    assert any(error in output for error in SANITIZER_ERRORS), output
