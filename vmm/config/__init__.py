"""The configuration: command line and JSON file in, one MachineConfig out.

This package is the only reader of argv and of the `-config` file; a command line is
read in the seed's form or in StratoVirt 2.x's (Kata's) into the same Draft (form.py).
Its entry point, `parse`, returns the validated MachineConfig, the notes the log should carry (which
command-line option overrode which file setting), and whether -print-config was asked.
"""

from dataclasses import dataclass

from .cmdline import draft_from_options, parse_command_line
from .errors import ConfigError
from .form import marker_2x
from .model import MachineConfig
from .validate import build

__all__ = ["ConfigError", "MachineConfig", "Invocation", "parse", "to_json"]


@dataclass(frozen=True)
class Invocation:
    config: MachineConfig
    notes: tuple[str, ...]
    print_config: bool


def parse(argv: list[str]) -> Invocation | int:
    """argv without the program name -> Invocation, or the exit status of --help or
    --version. Raises ConfigError for any user mistake."""
    marker = marker_2x(argv)
    if marker:
        from .cmdline2x import read                 # only for a 2.x line (start-up time)
        parsed = read(argv, marker)
        if isinstance(parsed, int):
            return parsed
        draft, print_config = parsed
        return Invocation(build(draft), (), print_config)
    parsed = parse_command_line(argv)
    if isinstance(parsed, int):
        return parsed
    values, print_config = parsed
    command_line = draft_from_options(values)
    notes: list[str] = []
    config_file = values.get("config")
    if config_file:
        from .jsonfile import read_config_file      # only with -config (start-up time)
        from .merge import merge
        draft, notes = merge(read_config_file(config_file[0]), command_line)
    else:
        draft = command_line
    return Invocation(build(draft), tuple(notes), print_config)


def to_json(config: MachineConfig) -> str:
    """The configuration as a -config JSON document (-print-config)."""
    from .render import to_json
    return to_json(config)
