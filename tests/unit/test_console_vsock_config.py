"""Configuration of the console and the vsock device: the vsock socket path, which the
StratoVirt configuration has no key for, is derived and checked before anything runs."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.framework.cli import stratovirt
from vmm.config import limits as L


def test_vsock_socket_in_the_api_channels_directory(files):
    sub = files.dir / "run"
    sub.mkdir()
    result = stratovirt("-kernel", str(files.kernel), "-api-channel", f"unix:{sub}/api.sock",
                        "-device", "vsock,id=v0,guest-cid=3", "-print-config")
    assert result.code == 0, result
    assert not (sub / "v0.vsock").exists()          # nothing created by checking


def test_existing_vsock_socket_is_refused(files):
    (files.dir / "v0.vsock").write_text("")
    error = stratovirt(*files.base(), "-device", "vsock,id=v0,guest-cid=3").error
    assert error.startswith(f'-device[0].id: the vsock socket "{files.dir}/v0.vsock"')
    assert "already exists" in error and "rm -f" in error


@pytest.fixture
def short_dir():
    """pytest's tmp_path is too long to test path limits with."""
    path = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_vsock_socket_with_its_port_suffix_must_fit_sun_path(short_dir, files):
    """<dir>/<id>.vsock_4294967295 must fit in 107 bytes: the longest id that fits is
    accepted, one more character is refused."""
    room = L.SOCKET_PATH_BYTES - L.VSOCK_PORT_SUFFIX_BYTES - len(L.VSOCK_SUFFIX)
    directory = short_dir / ("d" * (room - len(os.fsencode(short_dir)) - 1 - 1 - 40))
    directory.mkdir()
    free = room - len(os.fsencode(directory)) - 1          # bytes left for the id
    assert free == 40
    base = ["-kernel", str(files.kernel), "-api-channel", f"unix:{directory}/a.sock"]
    fits = stratovirt(*base, "-device", f"vsock,id={'v' * free},guest-cid=3", "-print-config")
    assert fits.code == 0, fits
    error = stratovirt(*base, "-device", f"vsock,id={'v' * (free + 1)},guest-cid=3").error
    assert error.startswith(f"-device[0].id: the vsock sockets \"{directory}/{'v' * 41}.vsock\"_<port>")
    assert f"take up to {L.SOCKET_PATH_BYTES + 1} bytes" in error
    assert "at most 107 bytes" in error


def test_vsock_socket_may_not_be_the_console_socket(files):
    error = stratovirt(*files.base(), "-chardev", f"id=c,path={files.dir}/v.vsock",
                       "-device", "vsock,id=v,guest-cid=3").error
    assert "is also the path of another file it creates" in error


def test_existing_console_socket_is_refused(files):
    files.console.write_text("")
    error = stratovirt(*files.base(), "-chardev", f"id=c,path={files.console}").error
    assert error.startswith(f'-chardev[0].path: console socket "{files.console}" already exists')


def test_guest_cid_below_3_is_refused(files):
    for cid in ("0", "1", "2"):
        error = stratovirt(*files.base(), "-device", f"vsock,id=v,guest-cid={cid}").error
        assert error == f"-device[0].guest-cid: {cid} as guest CID is out of range; " \
                        "allowed 3..4294967294"
