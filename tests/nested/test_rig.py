"""The nested rig itself: L1 has a real /dev/kvm, runs the freshly built project, and
reports the scenario's output and exit status."""

import json

import pytest

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]

KVM_API_VERSION = """\
test -c /dev/kvm || { echo "no /dev/kvm"; exit 1; }
/opt/vmm/bin/python -c '
from vmm._kvm import lib
import os
fd = os.open("/dev/kvm", os.O_RDWR)
print(lib.vmm_ioctl(fd, lib.KVM_GET_API_VERSION, 0))'
"""


def test_l1_has_kvm_and_the_native_module_talks_to_it(rig):
    result = rig.run(KVM_API_VERSION, timeout=300)
    assert (result.status, result.output) == (0, ["12"]), result.console


def test_stratovirt_is_installed_and_checks_the_l2_kernel(rig):
    result = rig.run("stratovirt --version && echo --- && stratovirt -kernel /l2/vmlinuz "
                     "-api-channel unix:/tmp/x.sock -print-config", timeout=300)
    assert result.status == 0, result.console
    version, config = result.text.split("\n---\n")
    assert version.startswith("stratovirt "), result.console
    assert json.loads(config)["boot-source"]["kernel_image_path"] == "/l2/vmlinuz"


def test_files_arrive_and_the_exit_status_comes_back(rig, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("from the host\n")
    # the sleep lets L1's 20 s heartbeat come, which must not reach the output
    scenario = """
sleep 25
cat note.txt
cat /payload/files/note.txt >&2
test -s /l2/rootfs.ext4 || exit 1
printf 'no newline at the end'
exit 7
"""
    result = rig.run(scenario, files={"note.txt": note}, timeout=300)
    assert result.status == 7, result.console
    assert result.output == ["from the host", "from the host", "no newline at the end"]
    assert result.scenario_seconds >= 25     # so a heartbeat came, and was kept out
