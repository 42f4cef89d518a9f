"""The restart policy: what the launcher does when a device's backend process dies.

A backend is its own process so that its failure is contained; restarting it turns the
containment into availability. The policy, per device (its slot):

- The first death is restarted at once; each further death within the window waits
  BACKOFF seconds, doubling, capped at BACKOFF_CAP: a backend that dies because of what
  it finds (a guest's ring that crashes it each time) costs little and is not restarted
  in a tight loop.
- At most `restarts` restarts in any `window` seconds (-backend-restart, default 5 in
  60): the death after that fails the device for good, as a backend with no restart
  does: one log line, the guest sees a device that no longer answers, the VM goes on.
- A backend that ends because its device was unplugged or the VM is ending is not a
  death (the launcher never asks here then).

Who restarts: the launcher forks the new backend from the same recipe as the first
(vmm/devices/virtio/attach.py, Attached.respawn: the same image or tap, confined the
same way) and hands its socket to the vm process, which reconnects the device
(vmm/devices/virtio/vhost_user_device.py). Only the timing and the counting are here.
"""

from collections import deque
from dataclasses import dataclass, field

from .config.model import BackendRestart

BACKOFF = 0.1             # seconds before the second restart within the window
BACKOFF_CAP = 2.0


@dataclass
class _History:
    deaths: deque = field(default_factory=deque)     # monotonic times within the window
    restarts: int = 0                                # over the VM's life


class RestartPolicy:
    def __init__(self, settings: BackendRestart):
        self.settings = settings
        self._history: dict[int, _History] = {}

    def died(self, slot: int, now: float) -> float | None:
        """A backend of `slot` died at `now`: in how many seconds to restart it, or None
        when the device is failed."""
        history = self._history.setdefault(slot, _History())
        history.deaths.append(now)
        while history.deaths and history.deaths[0] <= now - self.settings.window:
            history.deaths.popleft()
        recent = len(history.deaths)
        if recent > self.settings.restarts:
            return None
        history.restarts += 1
        return 0.0 if recent == 1 else min(BACKOFF * 2 ** (recent - 2), BACKOFF_CAP)

    def restarts(self, slot: int) -> int:
        """How many times the backend of `slot` was restarted over the VM's life."""
        history = self._history.get(slot)
        return history.restarts if history else 0

    def forget(self, slot: int) -> None:
        """The device left its slot (unplugged): the next one starts with a clean slate."""
        self._history.pop(slot, None)

    def describe(self) -> str:
        """Why a death fails the device, for its log line."""
        if not self.settings.restarts:
            return ", and restarts are off (-backend-restart restarts=0)"
        return (f" after {self.settings.restarts} restarts in {self.settings.window} s, the "
                "most -backend-restart allows")
