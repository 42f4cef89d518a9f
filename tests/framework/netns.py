"""Network namespaces a test owns, with taps in them, so test traffic never touches the
host's own interfaces.

    with Netns() as ns:
        ns.add_tap("tap0", "10.0.0.1/24")
        fd = ns.call(open_tap, "tap0")          # runs in a thread inside the namespace
        ns.run("ip", "neigh", "add", ...)       # a command inside it

Deleting the namespace on exit deletes every interface in it. Needs root.
"""

import ctypes
import itertools
import json
import os
import socket
import subprocess
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


class Netns:
    def __init__(self, prefix: str = "vmmt"):
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        # No IPv6 on new interfaces: no router solicitations or MLD reports among the
        # frames a test expects.
        self.run("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
        self.run("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=check,
                              capture_output=True, text=True)

    def command(self, *argv: str) -> list[str]:
        """argv prefixed so that it runs inside the namespace (for Popen)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def add_tap(self, name: str, address: str | None = None, mtu: int | None = None) -> None:
        """A persistent tap (vnet_hdr) in the namespace, up, with `address` (a/prefix)."""
        self.run("ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")
        if mtu:
            self.run("ip", "link", "set", name, "mtu", str(mtu))
        if address:
            self.run("ip", "addr", "add", address, "dev", name)
        self.run("ip", "link", "set", name, "up")

    def mac(self, name: str) -> bytes:
        info = json.loads(self.run("ip", "-j", "link", "show", name).stdout)[0]
        return bytes.fromhex(info["address"].replace(":", ""))

    def call(self, function, *args):
        """function(*args) in a thread that has entered the namespace (network
        namespaces are per thread); its result, or its exception."""
        result = {}

        def body():
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                result["value"] = function(*args)
            except BaseException as error:      # handed to the caller
                result["error"] = error
            finally:
                os.close(fd)

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket in the namespace (a socket keeps the namespace it was made in)."""
        return self.call(socket.socket, family, kind, proto)
