"""A StratoVirt-compatible x86_64 microVM monitor with sandboxed device backends."""

__version__ = "0.1.0"
