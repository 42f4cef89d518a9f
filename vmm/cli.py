"""The `stratovirt` program: configuration errors become one line and exit status 2."""

import sys

from . import config
from .config import ConfigError

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        invocation = config.parse(argv)
    except ConfigError as error:
        print(f"stratovirt: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(invocation, int):
        return invocation
    for note in invocation.notes:
        print(f"stratovirt: note: {note}", file=sys.stderr)
    if invocation.print_config:
        print(config.to_json(invocation.config))
        return 0
    print("stratovirt: error: this version validates configurations only; booting "
          "a VM is not built yet (use -print-config)", file=sys.stderr)
    return 1


def run() -> None:
    sys.exit(main())
