"""L2's shell on its serial console, for the L1 check scripts (copied into L1 beside
them by tests/nested/conftest.run_checks). Standard library only."""

import asyncio
import time

from console import Vm


class Guest:
    """L2's shell on the console. Each command's output is framed by markers of its own,
    so what the serial line echoes of the command itself is never taken for output."""

    def __init__(self, vm: Vm, prefix: str = "SH", command_seconds: float | None = None):
        """`prefix` tells one script's markers from another's; with `command_seconds`
        a command still running after that long is L2 stuck: the console's Timeout
        (the rig's own timeout would take far longer to say so)."""
        self.vm = vm
        self.prefix = prefix
        self.command_seconds = command_seconds
        self.count = 0

    def run_now(self, command: str) -> tuple[list[str], int]:
        """`command`'s output lines and exit status (blocking; `run` is the async one)."""
        self.count += 1
        tag = f"{self.prefix}{self.count}"
        if self.command_seconds:
            self.vm.deadline = time.monotonic() + self.command_seconds
        self.vm.send(f"echo {tag}-begin; {command}; echo {tag}-end-$?\n")
        found = self.vm.expect(rf"(?s)^{tag}-begin\n(.*?)^{tag}-end-(\d+)$")
        return found[1].splitlines(), int(found[2])

    async def run(self, command: str) -> tuple[list[str], int]:
        return await asyncio.to_thread(self.run_now, command)

    async def value(self, command: str) -> str:
        """The last line `command` printed."""
        lines, _ = await self.run(command)
        return lines[-1].strip() if lines else ""

    async def md5(self, source: str) -> str:
        return (await self.value(f"md5sum < {source}")).split()[0]

    async def wait_change(self, path: str, old: str, tries: int = 600) -> dict:
        """Poll `path` until it reads other than `old`: its value, the polls it took,
        and the L1 seconds the command took."""
        start = time.monotonic()
        value = await self.value(
            f'i=0; while [ "$(cat {path})" = "{old}" ] && [ $i -lt {tries} ]; do '
            f'sleep 0.1; i=$((i+1)); done; echo "$(cat {path}) $i"')
        now, polls = value.split()
        return {"value": now, "polls": int(polls),
                "seconds": round(time.monotonic() - start, 2)}

    async def expect(self, pattern: str):
        return await asyncio.to_thread(self.vm.expect, pattern)
