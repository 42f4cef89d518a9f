import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.framework.guest import tiny_guest


@dataclass
class Files:
    """Real files a configuration can name, in a private directory."""
    dir: Path
    kernel: Path
    initrd: Path
    disks: list[Path]
    api: Path
    console: Path

    def base(self) -> list[str]:
        return ["-kernel", str(self.kernel), "-api-channel", f"unix:{self.api}"]

    def write_json(self, document, name="config.json") -> Path:
        path = self.dir / name
        path.write_text(json.dumps(document) if not isinstance(document, str) else document)
        return path


@pytest.fixture
def files(tmp_path) -> Files:
    kernel = tmp_path / "vmlinux.bin"
    kernel.write_bytes(tiny_guest().read_bytes())
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(4096))
    disks = []
    for index in range(8):
        disk = tmp_path / f"disk{index}.img"
        disk.write_bytes(bytes(1 << 16))
        disks.append(disk)
    return Files(tmp_path, kernel, initrd, disks, tmp_path / "api.sock",
                 tmp_path / "console.sock")


@pytest.fixture
def nic():
    """start(page) -> (driver, namespace, tap MAC): tests/framework/net_backend.py; every
    backend started must still be alive at the end."""
    from tests.framework.net_backend import nic_backends
    with nic_backends() as start:
        started = []

        def checked(page):
            made = start(page)
            started.append(made[0].backend)
            return made
        yield checked
        for child in started:
            assert child.status is None, f"the backend died: {child.describe_end()}"
