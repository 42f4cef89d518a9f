"""Talking QMP with the real client from PyPI (qemu.qmp), synchronously for tests."""

import asyncio
import json
import socket

from qemu.qmp import QMPClient


def running(path: str, timeout: float) -> bool:
    """Whether the api-channel at `path` says the VM runs: greeting, qmp_capabilities,
    then query-status, whose reply waits until the vCPUs run (the server greets while
    the machine is still being built: vmm/qmp/server.py). False if it cannot be asked
    yet (no socket, refused, closed)."""
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(max(0.1, timeout))
            probe.connect(path)
            stream = probe.makefile("rwb")
            if b'"QMP"' not in stream.readline():
                return False
            for command in ("qmp_capabilities", "query-status"):
                stream.write(json.dumps({"execute": command}).encode() + b"\n")
                stream.flush()
                if "return" not in json.loads(stream.readline() or b"{}"):
                    return False
            return True
    except (OSError, ValueError):
        return False


class Events:
    """Every event the client has received so far, and a way to wait for one."""

    def __init__(self):
        self.seen: list[dict] = []

    def names(self) -> list[str]:
        return [event["event"] for event in self.seen]

    async def wait(self, name: str, timeout: float = 10) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for event in self.seen:
                if event["event"] == name:
                    return event
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {name} event; saw {self.names()}")


def session(path, steps, timeout: float = 30):
    """Connect to the api-channel, run `await steps(qmp, events)`, disconnect.

    The server closing the connection after `quit` is expected, as with QEMU.
    """
    async def main():
        qmp = QMPClient("test")
        await qmp.connect(str(path))
        events = Events()

        async def collect():
            async for event in qmp.events:
                events.seen.append(event)

        collector = asyncio.create_task(collect())
        try:
            return await asyncio.wait_for(steps(qmp, events), timeout)
        finally:
            collector.cancel()
            try:
                await qmp.disconnect()
            except EOFError:
                pass

    return asyncio.run(main())
