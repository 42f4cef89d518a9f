"""Which form a command line is written in: the seed's or StratoVirt 2.x's (Kata's).

A line is read as 2.x when it holds something only 2.x has: one of the options below, or
a -device whose driver is 2.x's (`virtio-*-device`, `vhost-*-device`, `virtconsole`),
a -netdev `tap,...` or a -chardev `socket,...` (the seed's values start with `vsock` or
`id=`). Every start runs this, so it is one pass of string tests; the 2.x reader is
imported only when it finds such a marker. What the seed has and 2.x lacks (SEED_ONLY)
is then refused by the 2.x reader as a mixed line.
"""

MARKER_OPTIONS = frozenset(("-qmp", "-machine", "-object", "-uuid"))
_FIRST_WORDS = {"-netdev": ("tap",), "-chardev": ("socket",), "-device": ("virtconsole",)}

# Seed-only options and values -> what 2.x writes instead.
SEED_ONLY = {
    "-api-channel": "-qmp unix:PATH,server,nowait",
    "-config": "no JSON file; every setting on the command line",
    "-omit_vm_memory": "-machine type=microvm,dump-guest-core=off",
    "-device vsock": "-device vhost-vsock-device,id=ID,guest-cid=N,vhostfd=FD",
    "-netdev id=": "-netdev tap,id=ID,ifname=TAP and -device virtio-net-device,netdev=ID,id=ID",
    "-chardev id=": "-chardev socket,id=ID,path=PATH,server,nowait and "
                    "-device virtconsole,chardev=ID,id=ID,nr=0",
}


def marker_2x(argv: list[str]) -> str | None:
    """The first word of argv that only StratoVirt 2.x's form has (`-qmp`,
    `-device virtio-blk-device`), or None for a seed line."""
    for option, value in zip(argv, argv[1:] + [""]):
        if option in MARKER_OPTIONS:
            return option
        first = value.partition(",")[0]
        if first in _FIRST_WORDS.get(option, ()) or (option == "-device" and first.startswith(
                ("virtio-", "vhost-")) and first.endswith("-device")):
            return f"{option} {first}"
    return None
