"""The one exception a configuration mistake raises, and how it reads on one line."""


class ConfigError(Exception):
    """A user mistake in the configuration: where it is, what is wrong, what is allowed.

    `where` names the option or JSON path (`-smp`, `drive[1].path_on_host`), so the
    user can find the culprit in either form of configuration.
    """

    def __init__(self, where: str, what: str, allowed: str = ""):
        super().__init__(where, what, allowed)
        self.where = where
        self.what = what
        self.allowed = allowed

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}"
        if self.allowed:
            text += f"; {self.allowed}"
        return one_line(text)


def one_line(text: str) -> str:
    """Escape every non-printable character (line breaks of any kind, terminal escape
    sequences), so a message is always one line and safe to print on a terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
