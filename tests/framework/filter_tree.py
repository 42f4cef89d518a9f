"""A process dressed as one of the VMM's, carrying whatever filters a test names, so that
`stratovirt seccomp check --deep` can be shown a thread with the wrong filter or one
missing (the VMM itself always installs the right ones).

    python filter_tree.py PROCESS_NAME ROLES [THREAD_NAME=ROLES ...]

ROLES is a comma-separated list of roles, oldest first, possibly empty. The main thread
names itself PROCESS_NAME and installs its ROLES' filters (built with vmm.sandbox from the
profiles, as the VMM builds them); each THREAD_NAME thread is then started, inherits
those, names itself and stacks its own ROLES. When every thread is in place the program
writes "ready\\n" and waits for standard input to close, then exits. Every role a thread
ends under must allow futex (all do); the main thread's must allow read and write.
"""

import os
import sys
import threading

import prctl
import pyseccomp

from vmm.sandbox import privileges, seccomp
from vmm.sandbox.profile import load


def install(f) -> None:
    """Load a libseccomp filter object into the calling thread with libseccomp's own load,
    so that its attributes (CTL_LOG) reach seccomp(2) as they would for any libseccomp
    user; the VMM itself loads exported programs (seccomp.install_program). libseccomp's
    prctl(PR_SET_NO_NEW_PRIVS) is turned off: the caller sets it once, before any filter
    (the vm role does not allow that prctl again under its filter). No TSYNC: filters are
    per thread."""
    if f.get_attr(pyseccomp.Attr.CTL_TSYNC):
        raise ValueError("refusing a TSYNC filter: filters are per thread")
    f.set_attr(pyseccomp.Attr.CTL_NNP, 0)
    f.load()


def roles(text: str) -> list[str]:
    return [role for role in text.split(",") if role]


def main(argv: list[str]) -> None:
    process_name, base, specs = argv[0], roles(argv[1]), [a.split("=", 1) for a in argv[2:]]
    # Built up front: once a filter is on, the profiles cannot be opened.
    built = {role: seccomp.build(load(role))
             for role in {*base, *(r for _, text in specs for r in roles(text))}}
    prctl.set_name(process_name)
    privileges.no_new_privs()
    for role in base:
        install(built[role])
    placed = threading.Semaphore(0)
    never = threading.Event()

    def thread(name: str, text: str) -> None:
        prctl.set_name(name)
        for role in roles(text):
            install(built[role])
        placed.release()
        never.wait()                    # a futex: every role allows it

    for name, text in specs:
        threading.Thread(target=thread, args=(name, text), daemon=True).start()
    for _ in specs:
        placed.acquire()
    os.write(1, b"ready\n")
    while os.read(0, 4096):
        pass
    os._exit(0)                         # no interpreter shutdown under the filters


if __name__ == "__main__":
    main(sys.argv[1:])
