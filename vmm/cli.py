"""The `stratovirt` program: configuration errors become one line and exit status 2."""

from . import timeline  # first: its import is the timeline's "process start"

import gc
import sys

from .zygote import client as zygote

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["seccomp"]:      # the auditor's subcommands (vmm/sandbox/audit.py)
        from .sandbox import audit
        return audit.main(argv[1:])
    if argv[:1] == ["metrics"]:      # a running VM's figures (vmm/metrics.py)
        from . import metrics
        return metrics.main(argv[1:])
    from . import config             # here, after run() has stopped the collector
    try:
        invocation = config.parse(argv)
    except config.ConfigError as error:
        print(f"stratovirt: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(invocation, int):
        return invocation
    timeline.mark("config parsed")
    if invocation.print_config:
        for note in invocation.notes:
            print(f"stratovirt: note: {note}", file=sys.stderr)
        print(config.to_json(invocation.config))
        return 0
    from . import launcher  # only a VM run needs KVM and the native module
    try:
        return launcher.run(invocation.config, invocation.notes)
    except KeyboardInterrupt:  # Ctrl-C before the VM runs: the launcher has cleaned up
        return EXIT_INTERRUPTED


def run() -> None:
    """The program (the console script, python -m vmm)."""
    if sys.argv[1:2] not in (["seccomp"], ["metrics"]):
        status = zygote.run(sys.argv)       # a zygote on this host forks the launcher
        if status is not None:
            sys.exit(status)
        # No collection while the VMM starts: its imports allocate objects by the
        # hundred thousand and none of them is garbage; collecting would cost ~6 ms of
        # the start. The launcher freezes what it has before each fork (vmm/children.py)
        # and collects again once it supervises; a run that ends sooner (an error,
        # -print-config, --help) never needs to.
        gc.disable()
    sys.exit(main())
