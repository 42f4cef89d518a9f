"""The kernel constants the profiles are written in, by name, from the headers (vmm._sigsys
is compiled against them), and the reverse: which name a filtered argument value has.

Used by seccomp_profiles/generate.py to write the numbers and by the auditor to show
them as names again.
"""

from .._sigsys import lib

# Which family of names an argument of a syscall is drawn from (syscall, index) -> prefixes.
_ARG_FAMILIES = {
    ("ioctl", 1): ("KVM_", "VHOST_", "TC", "FIO", "TUN", "BLK", "SIOC"),
    ("openat", 2): ("O_",),
    ("setsockopt", 1): ("SOL_",),
    ("setsockopt", 2): ("SO_",),
    ("fcntl", 1): ("F_",),
    ("fallocate", 1): ("FALLOC_FL_",),
    ("mmap", 2): ("PROT_",),
    ("mprotect", 2): ("PROT_",),
    ("clone", 0): ("CLONE_",),
    ("prctl", 0): ("PR_",),
    ("seccomp", 0): ("SECCOMP_SET", "SECCOMP_GET"),
    ("kill", 1): ("SIG",),
    ("tgkill", 2): ("SIG",),
    ("socket", 0): ("AF_",),
    ("socketpair", 0): ("AF_",),
    ("newfstatat", 3): ("AT_",),
    ("memfd_create", 1): ("MFD_",),
    ("unshare", 0): ("CLONE_",),
    ("mount", 3): ("MS_",),
    ("umount2", 1): ("MNT_",),
    ("io_uring_enter", 3): ("IORING_ENTER_",),
    ("io_uring_register", 1): ("IORING_REGISTER_",),
}


def value(name: str) -> int:
    """A constant's value by its C name, e.g. value("KVM_RUN")."""
    try:
        return getattr(lib, name)
    except AttributeError:
        raise KeyError(f"unknown constant {name}") from None


def names_for(syscall: str, index: int, number: int) -> str | None:
    """The symbolic form of `number` as argument `index` of `syscall`: one name, or
    flags joined with |; None when no family applies or nothing matches."""
    prefixes = _ARG_FAMILIES.get((syscall, index))
    if prefixes is None:
        return None
    family = {name: getattr(lib, name) for name in dir(lib)
              if name.startswith(prefixes) and isinstance(getattr(lib, name), int)}
    exact = sorted(name for name, v in family.items() if v == number)
    if exact:
        return exact[0]
    if prefixes in (("PROT_",), ("CLONE_",), ("FALLOC_FL_",), ("MFD_",), ("MS_",)) and number:
        bits = [name for name, v in sorted(family.items(), key=lambda kv: kv[1])
                if v and v & (v - 1) == 0 and number & v]
        if sum(family[b] for b in bits) == number:
            return "|".join(bits)
    return None
