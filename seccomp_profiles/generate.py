"""Writes seccomp_profiles/<role>.json from the tables below: a shared base that every
role gets (what a running, fully imported CPython 3.11 and the SIGSYS reporter need),
one small table per role, and the rule that the vm profile also carries what its vCPU
and QMP threads need (they inherit the vm filter and stack their own on it).

Numbers come from the kernel headers (vmm.sandbox.constants), never typed by hand; the
checked-in JSON is what runs and what auditors read, and tests/unit/test_seccomp_profiles.py
checks that it is what this script writes. Run after changing a table:
    .venv/bin/python seccomp_profiles/generate.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm.sandbox.constants import value  # noqa: E402
from vmm.sandbox.usage import ONLY_NESTED, STAYS  # noqa: E402

HERE = Path(__file__).resolve().parent
ALLOW, TRAP = "SCMP_ACT_ALLOW", "SCMP_ACT_TRAP"


def rule(names, comment, *args, action=ALLOW, errno=None, stays=None, nested=False) -> dict:
    """One entry. Minimality (docs/seccomp.md): an entry that a role's recorded sessions
    (scripts/seccomp_usage.py) may not call says why it stays: `nested` for a path only
    a Linux guest takes (the nested recording has it), `stays` for a reason of its own.
    tests/vm/test_seccomp_usage.py fails on an unused entry that says neither."""
    if nested:
        comment += f" ({ONLY_NESTED}.)"
    if stays:
        comment += f" {STAYS}: {stays}"
    entry = {"names": names.split(), "action": action}
    if errno:
        entry["errnoRet"] = value(errno)
    if args:
        entry["args"] = list(args)
    entry["comment"] = comment
    return entry


def eq(index: int, name: str) -> dict:
    """arg == a constant, by name; flags joined with | are summed."""
    return {"index": index, "value": sum(value(n) for n in name.split("|")), "valueTwo": 0,
            "op": "SCMP_CMP_EQ"}


def masked(index: int, mask: list[str], expect: list[str]) -> dict:
    """(arg & mask) == expect, with both given as flag names."""
    return {"index": index, "value": sum(value(n) for n in mask),
            "valueTwo": sum(value(n) for n in expect), "op": "SCMP_CMP_MASKED_EQ"}


def ioctl(name: str, why: str, **minimality) -> dict:
    return rule("ioctl", f"{name}: {why}", eq(1, name), **minimality)


NO_EXEC = masked(2, ["PROT_EXEC"], [])
NAMESPACES = ["CLONE_NEWNS", "CLONE_NEWCGROUP", "CLONE_NEWUTS", "CLONE_NEWIPC",
              "CLONE_NEWUSER", "CLONE_NEWPID", "CLONE_NEWNET"]

# Every role: what any thread of an already-imported CPython 3.11 may do, and the SIGSYS
# reporter (native/sigsys.c: write, rt_sigaction, getpid, gettid, tgkill, rt_sigreturn).
BASE = [
    rule("futex", "The GIL and every Python lock, condition and event."),
    rule("brk munmap mremap",
         "CPython's and glibc's allocators grow, shrink and release memory; munmap also "
         "unmaps a closed mmap object.",
         stays="any thread that allocates may grow the main arena (brk; threads share it "
         "once there are more threads than arenas) or resize a block above the 128 KiB "
         "mmap threshold (mremap)."),
    rule("mmap", "Allocator arenas, thread stacks, mmap objects: never executable "
         "(PROT_EXEC clear), so no new code can be mapped.", NO_EXEC,
         stays="any allocation above the mmap threshold, in any thread running Python."),
    rule("mprotect", "glibc sets up malloc arenas and stack guard pages and grows a "
         "thread's arena heap; never adds PROT_EXEC.", NO_EXEC,
         stays="a thread's arena heap grows by mprotect whenever it allocates past it."),
    rule("close", "Closing fds the role holds; Python closes a socket or file in whichever "
         "thread drops its last reference.",
         stays="the cyclic garbage collector runs, and finalizes socket and file objects, "
         "in whichever thread happens to allocate."),
    rule("write", "Log lines (stderr or the -D log file); also how the SIGSYS reporter "
         "writes its violation line."),
    rule("rt_sigaction", "Python's signal handlers; the SIGSYS reporter restores SIG_DFL "
         "before it re-raises.", stays="the SIGSYS reporter needs it on a violation."),
    rule("rt_sigprocmask", "glibc blocks signals around thread creation and exit; the "
         "launcher unblocks SIGTERM and SIGHUP once it supervises."),
    rule("rt_sigreturn", "Return from any signal handler (the vCPU kick, Python's C-level "
         "handler).", stays="a signal sent to the process (SIGTERM) is handled by whichever "
         "of its threads the kernel picks."),
    rule("getpid gettid", "logging records the pid, threading the native thread id; the "
         "SIGSYS reporter addresses its own thread.",
         stays="the SIGSYS reporter calls both on a violation, and a log line getpid."),
    rule("tgkill", "The SIGSYS reporter re-raises SIGSYS with SIG_DFL so the process dies "
         "by the signal, visible to the launcher.", eq(2, "SIGSYS"),
         stays="only on a violation (tests/unit/test_seccomp_confine.py makes them)."),
    rule("restart_syscall", "The kernel resumes a timed wait (futex, poll, nanosleep) "
         "that a signal interrupted without running a handler in this thread: SIGTERM "
         "taken by another thread of the process, SIGSTOP/SIGCONT. Only an already "
         "allowed call continues.",
         stays="only after a stop and continue (Ctrl-Z, fg) or a signal another thread "
         "took; without it such a thread dies by SIGSYS."),
    rule("clock_gettime", "time.time()/monotonic() where the vDSO cannot answer.",
         stays="this host's vDSO answers; where the clocksource is one the vDSO cannot "
         "read (L1 under TCG in the nested run) every role calls it."),
    rule("newfstatat", "stat of a path (importlib, linecache formatting a traceback) fails "
         "like open does.", masked(3, ["AT_EMPTY_PATH"], []),
         action="SCMP_ACT_ERRNO", errno="EACCES",
         stays="what a stray stat gets instead of killing the process."),
    rule("openat", "No file is opened once a role runs: a stray open (a lazy import, "
         "a traceback's source lines, glibc probing /sys) fails with EACCES instead of "
         "killing the process.", action="SCMP_ACT_ERRNO", errno="EACCES",
         stays="what a stray open gets instead of killing the process (glibc's CPU count "
         "with many vCPUs opens /sys and /proc files)."),
]

# Roles that are processes (not the vcpu and api threads, which never end the process).
PROCESS = [
    rule("exit_group", "The process ends (sys.exit, os._exit)."),
]

# A thread that ends under the filter.
THREAD_END = [
    rule("exit", "A thread ends."),
    rule("madvise", "glibc releases an ending thread's stack and a thread arena's free "
         "pages."),
]

# Roles that start threads after their filter is on; the threads run under it.
THREADS = [
    rule("clone", "New threads only: CLONE_THREAD set, no namespace flag; never a new "
         "process.", masked(0, ["CLONE_THREAD"] + NAMESPACES, ["CLONE_THREAD"])),
    rule("clone3", "glibc tries clone3 first, whose flags are in memory a filter cannot "
         "read; ENOSYS makes it fall back to clone, whose flags are checked.",
         action="SCMP_ACT_ERRNO", errno="ENOSYS"),
    rule("set_robust_list rseq", "glibc's start of every new thread."),
] + THREAD_END

# Device backends: guest RAM arrives as a memfd at SET_MEM_TABLE and is mapped.
GUEST_RAM = [
    rule("newfstatat", "fstat of an fd the role holds (glibc's fstat is newfstatat with "
         "AT_EMPTY_PATH): Python's mmap checks the memfd of guest RAM it maps.",
         masked(3, ["AT_EMPTY_PATH"], ["AT_EMPTY_PATH"])),
]

VCPU = [
    ioctl("KVM_RUN", "enter the guest; the run loop is C (vmm_vcpu_run) with the GIL released."),
    ioctl("KVM_GET_REGS", "read rip for the report of an exit the VMM cannot handle.",
          stays="the report of an exit the VMM cannot handle, which ends the VM."),
    ioctl("KVM_IRQ_LINE", "the guest's port I/O to the UART raises or lowers its "
          "interrupt (THRE, receive).", nested=True),
    rule("read", "A virtio-mmio reset drains the queues' ioeventfds.", nested=True),
    rule("sendto sendmsg", "virtio-mmio activation (the vCPU thread that writes DRIVER_OK) "
         "sends vhost-user requests, the kick and call eventfds as SCM_RIGHTS.", nested=True),
    rule("recvfrom recvmsg", "vhost-user replies (REPLY_ACK, GET_VRING_BASE on reset).",
         nested=True),
] + [
    # The kernel's vhost-vsock (vmm/devices/virtio/vsock/vhost.py): owner, CID and memory
    # table are set before any filter; the thread that writes DRIVER_OK or resets the
    # device hands the kernel the rings and starts or stops it.
    ioctl(name, f"{why} Only with a vhost-vsock device (2.x's vhost-vsock-device).",
          nested=True)
    for name, why in (
        ("VHOST_SET_FEATURES", "the features the guest's driver accepted."),
        ("VHOST_SET_VRING_NUM", "a ring's size."),
        ("VHOST_SET_VRING_BASE", "where a ring resumes."),
        ("VHOST_SET_VRING_ADDR", "a ring's place in guest RAM (this process's addresses)."),
        ("VHOST_SET_VRING_KICK", "the queue's ioeventfd as the ring's kick."),
        ("VHOST_SET_VRING_CALL", "the slot's irqfd as the ring's call."),
        ("VHOST_VSOCK_SET_RUNNING", "start the device at DRIVER_OK, stop it at a reset."),
        ("VHOST_GET_VRING_BASE", "where a stopped ring is (a reset)."))
]

API = [
    rule("accept4", "Accept a QMP client on the api-channel socket the launcher bound."),
    rule("poll", "The server's one loop waits on the listener, every client and its wake "
         "eventfd (vmm/qmp/server.py)."),
    rule("read", "Drain the wake eventfd that emit() writes from other threads."),
    rule("recvmsg", "Read QMP input with the fds a client passes (getfd); the broker's "
         "replies, with a hot-plugged backend's connection; vhost-user replies."),
    rule("recvfrom", "vhost-user replies (GET_FEATURES, GET_CONFIG, GET_VRING_BASE) while "
         "a hot-plugged device is set up or unplugged."),
    rule("sendto", "Send QMP replies and events; vhost-user requests without fds."),
    rule("sendmsg", "Requests to the launcher's broker (with a tap fd for netdev_add fds=); "
         "vhost-user requests with fds (guest RAM, kick and call eventfds)."),
    rule("getsockname", "Python's socket object of an accepted client asks its address."),
    rule("tgkill", "stop/cont/quit kick the vCPU threads out of KVM_RUN (SIGUSR1).",
         eq(2, "SIGUSR1")),
    ioctl("KVM_IOEVENTFD", "a slot changing hands routes QueueNotify to the new device: an "
          "ioeventfd for a backend, an exit for an empty slot (vmm/devices/virtio/mmio.py)."),
    ioctl("KVM_IRQ_LINE", "system_powerdown pulses the ACPI power button's interrupt."),
]

VM = [
    rule("read", "The stdin pump thread reads the host terminal into the UART."),
    rule("sendmsg", "Events to the launcher over the control channel; vhost-user requests "
         "with SCM_RIGHTS (memfds of guest RAM, eventfds) to the device backends."),
    rule("sendto", "vhost-user requests without fds (a vCPU thread's DRIVER_OK and reset "
         "also go through here)."),
    rule("tgkill", "Pause and stop kick the vCPU threads out of KVM_RUN (SIGUSR1).",
         eq(2, "SIGUSR1")),
    ioctl("KVM_IRQ_LINE", "serial input raises the UART interrupt from the stdin pump "
          "thread.", nested=True),
    rule("sched_getaffinity", "glibc counts CPUs when a thread first needs a malloc arena "
         "and there are more than 8: with /sys and /proc closed to it (openat fails) it "
         "falls back to this. New threads start under this filter: a VM with many vCPUs "
         "takes this path."),
    rule("prctl", "The vCPU and QMP threads name themselves (vmm-vcpuN, vmm-qmp): the names "
         "`stratovirt seccomp check` reads.", eq(0, "PR_SET_NAME")),
    rule("seccomp", "Each vCPU and the QMP thread stack their own filter on this one "
         "(a filter can only narrow what is allowed).", eq(0, "SECCOMP_SET_MODE_FILTER")),
]

BLK = [
    rule("read", "Kick eventfds and the rings' stop pipes."),
    rule("recvmsg", "vhost-user requests, with the fds of guest RAM and of the eventfds as "
         "SCM_RIGHTS."),
    rule("recvfrom", "The payload of a vhost-user request."),
    rule("sendto", "vhost-user replies."),
    rule("ppoll", "Each ring's worker (native/blkio.c) waits for its kick eventfd, its "
         "stop pipe or its engine's completions; while a request waits for the disk's rate "
         "limiter, until the limiter lets it go (a timeout finer than poll's milliseconds)."),
    rule("pipe2", "A ring's stop pipe, made when the frontend starts the ring."),
    rule("preadv pwritev", "Guest reads and writes: the disk to and from guest RAM, "
         "vectored, from the C request path (native/blkio.c)."),
    rule("fdatasync", "VIRTIO_BLK_T_FLUSH."),
    rule("fallocate", "DISCARD, and WRITE_ZEROES that may unmap, punch a hole in an image "
         "file (native/blkio.c).", eq(1, "FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE")),
    rule("fallocate", "WRITE_ZEROES zeroes a range of an image file without writing it.",
         eq(1, "FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE")),
    ioctl("BLKDISCARD", "DISCARD on a disk that is a block device.",
          stays="only for a disk that is a block device (the recorded sessions use a loop "
          "device when run as root)."),
    rule("fcntl", "Python's mmap duplicates the memfd it maps.", eq(1, "F_DUPFD_CLOEXEC")),
    # The inflight region (vhost-user INFLIGHT_SHMFD, vmm/vhost_user/backend.py).
    rule("memfd_create", "GET_INFLIGHT_FD: the inflight region is a new memfd, "
         "close-on-exec and sealable, nothing else (no huge pages, no exec).",
         eq(1, "MFD_CLOEXEC|MFD_ALLOW_SEALING")),
    rule("ftruncate", "GET_INFLIGHT_FD: the new region's size (a new memfd reads as "
         "zeroes, so every queue's part starts fresh)."),
    rule("fcntl", "GET_INFLIGHT_FD: the region is sealed so it can never shrink under a "
         "mapping, grow, or take other seals.", eq(1, "F_ADD_SEALS")),
    rule("fcntl", "SET_INFLIGHT_FD: a region handed back is mapped only if it is sealed "
         "against shrinking (a file that shrank under the mapping would fault us).",
         eq(1, "F_GET_SEALS")),
    rule("sendmsg", "GET_INFLIGHT_FD's reply carries the region's memfd (SCM_RIGHTS)."),
    # O_DIRECT disks' I/O engines (native/blkio.c), made before this filter: the calls
    # that make them are the launcher's (FORKED_BACKEND), never this role's, so a
    # backend cannot make a ring without the restrictions. io_uring operations are not
    # seen by seccomp; the ring's own restrictions (docs/seccomp.md, "io_uring") hold
    # them to READV, WRITEV and FSYNC on the disk.
    rule("io_uring_enter", "O_DIRECT disk: hand a batch of requests to the queue's "
         "restricted ring (flags 0; liburing adds GETEVENTS when completions must be "
         "flushed).", {"index": 3, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_EQ"}),
    rule("io_uring_enter", "O_DIRECT disk: wait for the ring's completions when a ring "
         "stops or breaks with requests in flight (blk_drain).",
         eq(3, "IORING_ENTER_GETEVENTS"),
         stays="only when a ring stops or breaks while requests are in flight (or liburing "
         "flushes completions); tests/unit/test_vhost_user_blk_engine.py stops a busy ring "
         "and kills backends with writes held."),
    rule("io_submit", "O_DIRECT disk where io_uring is refused: hand requests to the "
         "queue's Linux AIO context (PREADV, PWRITEV, FDSYNC)."),
    rule("io_getevents", "O_DIRECT disk where io_uring is refused: reap the AIO context's "
         "completions (its eventfd says when)."),
]

NET = [
    rule("read", "Kick eventfds, the rings' stop pipes, and frames from the tap "
         "(native/netio.c reads them into its frame buffer)."),
    rule("writev", "Frames to the tap: the driver's header and frame, straight from guest "
         "RAM (native/netio.c)."),
    rule("recvmsg", "vhost-user requests, with the fds of guest RAM and of the eventfds as "
         "SCM_RIGHTS."),
    rule("recvfrom", "The payload of a vhost-user request."),
    rule("sendto", "vhost-user replies."),
    rule("ppoll", "Each ring's worker (native/netio.c) waits for its kick eventfd or its "
         "stop pipe, the receive ring's also for the tap; while a frame waits for the "
         "direction's rate limiter, until the limiter lets it go (a timeout finer than "
         "poll's milliseconds).", nested=True),
    rule("pipe2", "A ring's stop pipe, made when the frontend starts the ring."),
    rule("fcntl", "Python's mmap duplicates the memfd it maps.", eq(1, "F_DUPFD_CLOEXEC")),
    ioctl("TUNSETVNETHDRSZ", "at SET_FEATURES the tap's vnet header size becomes the "
          "driver's header size (12 bytes, or 10 for a legacy driver)."),
    ioctl("TUNSETOFFLOAD", "at SET_FEATURES the tap may hand over only what the driver "
          "can receive (partial checksums, TSO, UFO)."),
]

# A console backend: vhost-user like virtio-blk, plus its one-client console socket.
CONSOLE = [
    rule("read", "Kick and wake eventfds, and the rings' stop pipes."),
    rule("recvmsg", "vhost-user requests, with the fds of guest RAM and of the eventfds as "
         "SCM_RIGHTS; client input straight into the guest's receive buffers "
         "(recvmsg_into)."),
    rule("recvfrom", "The payload of a vhost-user request; a peek at the client's input."),
    rule("sendto", "vhost-user replies; guest output to the client, and the one-line "
         "refusal a second client gets."),
    rule("accept4", "Take a client on the console socket the launcher bound (and refuse a "
         "second one)."),
    rule("getsockname", "Python's socket object for an accepted client checks the fd is a "
         "socket."),
    rule("poll", "Each ring's worker waits for its kick, wake eventfd or stop pipe; the "
         "port's thread for the console socket and its client."),
    rule("pipe2", "A ring's stop pipe, made when the frontend starts the ring."),
    rule("fcntl", "Python's mmap duplicates the memfd it maps.", eq(1, "F_DUPFD_CLOEXEC")),
]

# A vsock backend: vhost-user, its listening socket, and the one role that may create
# and connect sockets: a guest's connection to port P reaches <socket>_P on the host.
VSOCK = [
    rule("read", "Kick and wake eventfds, and the rings' stop pipes."),
    rule("recvmsg", "vhost-user requests, with the fds of guest RAM and of the eventfds as "
         "SCM_RIGHTS; host stream data straight into the guest's receive buffers "
         "(recvmsg_into)."),
    rule("recvfrom", "The payload of a vhost-user request; host stream data and peeks; a "
         "host client's CONNECT line."),
    rule("sendto", "vhost-user replies; buffered guest data and the OK line to host "
         "sockets."),
    rule("sendmsg", "Guest stream data to a host socket straight from guest RAM."),
    rule("accept4", "Take a host client on the vsock socket the launcher bound."),
    rule("getsockname", "Python's socket object for an accepted client checks the fd is a "
         "socket."),
    rule("socket", "A guest connection to port P: a unix socket to connect to <socket>_P. "
         "AF_UNIX only: no network.", eq(0, "AF_UNIX")),
    rule("connect", "Connect it (non-blocking; a refusal becomes the guest's RST)."),
    rule("shutdown", "The guest's SHUTDOWN(SEND) becomes the host reader's end of stream."),
    rule("poll", "Each ring's worker waits for its kick, wake eventfd or stop pipe; the "
         "host thread for the listening socket and every stream's socket."),
    rule("pipe2", "A ring's stop pipe, made when the frontend starts the ring."),
    rule("fcntl", "Python's mmap duplicates the memfd it maps.", eq(1, "F_DUPFD_CLOEXEC")),
]

# An rng backend: vhost-user, and reading its entropy source into guest RAM.
RNG = [
    rule("read", "Kick eventfds and the ring's stop pipe."),
    rule("readv", "The entropy source (the fd the launcher opened) straight into the "
         "guest's buffers."),
    rule("recvmsg", "vhost-user requests, with the fds of guest RAM and of the eventfds as "
         "SCM_RIGHTS."),
    rule("recvfrom", "The payload of a vhost-user request."),
    rule("sendto", "vhost-user replies."),
    rule("poll", "The ring's worker waits for its kick or stop pipe, at most until the "
         "rate limit lets the next request go."),
    rule("pipe2", "A ring's stop pipe, made when the frontend starts the ring."),
    rule("fcntl", "Python's mmap duplicates the memfd it maps.", eq(1, "F_DUPFD_CLOEXEC")),
]

# The launcher alone may open files, and only without following a symlink in the last
# component: the broker's images (an O_PATH look at the type first), /dev/net/tun for a
# tap, /dev/null for a forked backend's stdin (vmm/broker.py has the policy), and a
# forked backend's id maps (vmm/sandbox/empty_root.py).
OPENER = [
    rule("openat", "Open with O_NOFOLLOW: the broker's images (O_PATH first, to read the "
         "type without opening a device), /dev/net/tun for a hot-plugged tap, /dev/null "
         "as a forked backend's stdin, and its /proc/self/setgroups, uid_map and gid_map "
         "as it enters its empty root.", masked(2, ["O_NOFOLLOW"], ["O_NOFOLLOW"])),
    rule("openat", "Any other open fails with EACCES, as in every role.",
         masked(2, ["O_NOFOLLOW"], []), action="SCMP_ACT_ERRNO", errno="EACCES",
         stays="what a stray open gets instead of killing the process."),
]

# What a backend does between its fork from the confined launcher and its own filter
# (vmm/children.py, sandbox.confine): it runs under the launcher's filter until then.
FORKED_BACKEND = [
    rule("getppid", "A forked backend checks its parent is still the launcher after "
         "PR_SET_PDEATHSIG."),
    rule("set_robust_list", "glibc's fork sets up the new process's robust futex list."),
    rule("getrandom", "Python's random module reseeds itself in a forked child "
         "(os.register_at_fork) once anything in the forking process imported it.",
         stays="a launcher that compiled its filters in memory (no usable cache: in L1, "
         "under the jailer) imported pyseccomp, whose ctypes.util imports tempfile and so "
         "random; every backend it forks (hot-plug, restart) then calls it at once. It "
         "only reads the kernel's random pool."),
    rule("prlimit64", "A forked backend reads its fd limit (os.sysconf) to close every fd "
         "above its own; reading only, no new limit (arg2 NULL).",
         {"index": 2, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_EQ"}),
    rule("dup2", "A forked backend's stdin becomes /dev/null."),
    rule("close_range", "A forked backend closes every fd it was not given."),
    rule("prctl", "A forked backend names itself (vmm-blk-<id>).", eq(0, "PR_SET_NAME")),
    rule("prctl", "A forked backend dies with the launcher.", eq(0, "PR_SET_PDEATHSIG")),
    rule("prctl", "A forked backend sets no_new_privs before its filter.",
         eq(0, "PR_SET_NO_NEW_PRIVS")),
    rule("prctl", "A forked backend reads its capability bounding set, one by one.",
         eq(0, "PR_CAPBSET_READ")),
    rule("prctl", "A forked backend empties its capability bounding set.",
         eq(0, "PR_CAPBSET_DROP")),
    rule("prctl", "A forked backend clears its ambient capabilities.",
         eq(0, "PR_CAP_AMBIENT")),
    rule("capget capset", "A forked backend drops every capability."),
    rule("seccomp", "A forked backend installs its own filter, stacked on this one.",
         eq(0, "SECCOMP_SET_MODE_FILTER")),
    rule("eventfd2", "A restarted console or vsock backend makes its wake eventfds "
         "(one per queue) before its own filter; a forked disk backend on Linux AIO, the "
         "eventfd its completions signal."),
    rule("io_uring_setup", "A forked O_DIRECT disk backend makes one ring per queue "
         "(disabled until restricted) before its own filter, which does not allow it."),
    rule("io_uring_register", "... registers its disk as the ring's only file ...",
         eq(1, "IORING_REGISTER_FILES")),
    rule("io_uring_register", "... restricts the ring to READV, WRITEV and FSYNC on that "
         "fixed file, and no register call after ...", eq(1, "IORING_REGISTER_RESTRICTIONS")),
    rule("io_uring_register", "... and enables it.", eq(1, "IORING_REGISTER_ENABLE_RINGS")),
    rule("io_setup", "A forked O_DIRECT disk backend where io_uring is refused makes a Linux "
         "AIO context per queue before its own filter.",
         stays="only where io_uring is refused (kernel.io_uring_disabled, an old kernel, a "
         "container's policy); tests/unit/test_vhost_user_blk_engine.py makes that happen."),
    rule("statx", "A forked disk backend reads its image's direct-I/O alignment "
         "(STATX_DIOALIGN)."),
    ioctl("BLKSSZGET", "a forked disk backend reads a block device's sector size.",
          stays="only for an image that is a block device."),
    ioctl("BLKGETSIZE64", "a forked disk backend reads a block device's size.",
          stays="only for an image that is a block device."),
    ioctl("TUNSETOFFLOAD", "a forked NIC backend probes which offloads its tap takes."),
    ioctl("TUNSETVNETHDRSZ", "a forked NIC backend sets its tap's header size."),
] + [
    # Its empty root (vmm/sandbox/empty_root.py), entered before its capabilities go and
    # its filter goes on; the uid_map/gid_map writes are opens with O_NOFOLLOW (OPENER).
    rule("unshare", "A forked backend moves into new user, mount and IPC namespaces, "
         "exactly these three, for its empty root.",
         eq(0, "CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWIPC")),
    rule("mount", "A forked backend makes every mount of its new mount namespace private "
         "(MS_REC|MS_PRIVATE on /), so nothing it mounts propagates.",
         eq(3, "MS_REC|MS_PRIVATE")),
    rule("mount", "A forked backend mounts the tmpfs that becomes its empty root (no "
         "suid, no devices, no exec).", eq(3, "MS_NOSUID|MS_NODEV|MS_NOEXEC")),
    rule("mount", "A restarted vsock backend bind-mounts its socket directory into that "
         "tmpfs, at the same path (the guest's streams connect to <socket>_<port>).",
         eq(3, "MS_BIND|MS_REC")),
    rule("mount", "A forked backend remounts that tmpfs read-only before it becomes its "
         "root.", eq(3, "MS_REMOUNT|MS_RDONLY|MS_NOSUID|MS_NODEV|MS_NOEXEC")),
    rule("mkdir", "A restarted vsock backend makes its socket directory's path in that "
         "tmpfs (mode 0755 only), to bind-mount the directory there.",
         {"index": 1, "value": 0o755, "valueTwo": 0, "op": "SCMP_CMP_EQ"}),
    rule("chdir", "A forked backend enters the tmpfs before pivot_root, and its new / "
         "after."),
    rule("pivot_root", "A forked backend makes the tmpfs its root (pivot_root(\".\", "
         "\".\"))."),
    rule("umount2", "A forked backend detaches its old root, stacked on the new one by "
         "pivot_root.", eq(1, "MNT_DETACH")),
]

LAUNCHER = [
    rule("poll", "Wait on the control channel and on the backends' pidfds at once."),
    rule("clone", "Fork a hot-plugged disk's or NIC's backend (vmm/broker.py): a new "
         "process, never a thread, never a new namespace.",
         masked(0, ["CLONE_THREAD", "CLONE_VM"] + NAMESPACES, [])),
    rule("pidfd_open", "Watch a hot-plugged backend's end in the same poll."),
    rule("socketpair", "A hot-plugged backend's vhost-user connection.", eq(0, "AF_UNIX")),
    rule("setsockopt", "A reply timeout on the vm process's end of a backend's connection "
         "(vmm/devices/virtio/attach.py).", eq(1, "SOL_SOCKET"), eq(2, "SO_RCVTIMEO")),
    rule("setsockopt", "A send timeout on the same.", eq(1, "SOL_SOCKET"),
         eq(2, "SO_SNDTIMEO")),
    rule("sendmsg", "Replies to the vm process's requests, a hot-plugged backend's "
         "connection as SCM_RIGHTS."),
    rule("newfstatat", "fstat of an image the broker opens (glibc's fstat is newfstatat "
         "with AT_EMPTY_PATH): its type, its identity (st_dev, st_ino).",
         masked(3, ["AT_EMPTY_PATH"], ["AT_EMPTY_PATH"])),
    rule("lseek", "An opened image's size (blockdev-add's reply)."),
    ioctl("TUNSETIFF", "attach a hot-plugged NIC's existing tap (tap.py)."),
    ioctl("TUNGETIFF", "check a tap's flags and read its name (a tap passed with getfd)."),
    ioctl("FIONBIO", "a tap passed with getfd is made non-blocking (os.set_blocking), as "
          "its backend reads it until EAGAIN."),
    rule("socket", "A datagram socket for the tap's ioctls by name (its MTU; glibc's "
         "if_nametoindex).", eq(0, "AF_UNIX")),
    ioctl("SIOCGIFMTU", "a hot-plugged NIC's tap's MTU, offered to the guest."),
    ioctl("SIOCGIFINDEX", "if_nametoindex: does the tap exist (a missing one is refused, "
          "never created)."),
    rule("pselect6", "select.select: wait, with a deadline, for a backend to end after the "
         "vm process."),
    rule("recvmsg", "Events from the vm process over the control channel."),
    rule("wait4", "Reap the vm process and the backends (os.waitpid)."),
    rule("kill", "Forward SIGTERM/SIGINT/SIGHUP to the vm process as SIGTERM.",
         eq(1, "SIGTERM")),
    rule("kill", "Kill a backend that does not stop after the VM.", eq(1, "SIGKILL"),
         stays="a backend still there BACKEND_GRACE seconds after the VM ended."),
    rule("unlink", "Remove the api-channel socket, the pidfile and the metrics file it "
         "created."),
    rule("rename", "-metrics: the file written beside it (O_NOFOLLOW) replaces the last "
         "one, so a reader never sees half a file (docs/metrics.md).",
         stays="only with -metrics (tests/vm/test_metrics.py)."),
    ioctl("TCGETS", "Python's termios.tcsetattr reads the attributes (tcgetattr) before "
          "it restores them on exit."),
    ioctl("TCSETSW", "restore the terminal's attributes (tcsetattr TCSADRAIN) on exit."),
    rule("getsockname getpeername", "Python's repr of a socket it closes late (a "
         "ResourceWarning) asks the socket's addresses."),
]

ROLES = {
    "launcher": ("The launcher once the vm process runs: supervise, reap, clean up, and "
                 "broker hot-plug: open what the policy allows (vmm/broker.py) and fork "
                 "backends, which run under this filter until they install their own.",
                 LAUNCHER + FORKED_BACKEND),
    "vm": ("The vm process: its main thread and its helper threads (stdin pump), installed "
           "before any thread starts, so the vCPU and QMP threads inherit it and carry "
           "their own on top.", VM + THREADS),
    "vcpu": ("One vCPU thread, stacked on the vm filter before it first enters the guest.",
             VCPU),
    "api": ("The QMP thread, stacked on the vm filter before it accepts a client.", API),
    "virtio-blk": ("A virtio-blk vhost-user backend process, installed before it reads "
                   "anything from its socket.", BLK + THREADS),
    "virtio-net": ("A virtio-net vhost-user backend process, installed before it reads "
                   "anything from its socket; it holds a tap it cannot reconfigure beyond "
                   "header size and offloads.", NET + THREADS),
    "virtio-console": ("A virtio-console vhost-user backend process, installed before its "
                       "port's thread starts and before it reads anything from its socket "
                       "or a client.", CONSOLE + THREADS),
    "virtio-vsock": ("A virtio-vsock vhost-user backend process, installed before its host "
                     "thread starts and before it reads anything from its socket, the "
                     "guest or a host client; it may create and connect AF_UNIX sockets "
                     "(the guest's streams to <socket>_<port>).", VSOCK + THREADS),
    "virtio-rng": ("A virtio-rng vhost-user backend process, installed before it reads "
                   "anything from its socket or its entropy source.", RNG + THREADS),
}
# Their threads start under the vm filter; hot-plugged backends (disks, NICs) and
# restarted ones (every kind: vmm/restart.py) are forked under the launcher's.
INHERITED_BY = {"vm": ("vcpu", "api"),
                "launcher": ("virtio-blk", "virtio-net", "virtio-console", "virtio-vsock",
                             "virtio-rng")}
OPENERS = ("launcher",)

DEFAULT_COMMENT = (
    "Default SCMP_ACT_TRAP: a syscall outside this profile raises SIGSYS; the reporter "
    "(native/sigsys.c) writes 'seccomp violation: role=<role> syscall=<nr> (<name>)' to "
    "the log, then the process dies by SIGSYS. Nothing catches SIGSYS and goes on: "
    "without the reporter, SIGSYS's default action kills the process just the same.")


def profile(role: str) -> dict:
    what, own = ROLES[role]
    stacked = role in INHERITED_BY["vm"]          # a thread role: the process goes on
    base = [e for e in BASE if role not in OPENERS or e["names"] != ["openat"]]
    entries = base + (OPENER if role in OPENERS else []) + \
        (THREAD_END if stacked else PROCESS) + \
        (GUEST_RAM if role.startswith("virtio-") else []) + own
    for inheritor in INHERITED_BY.get(role, ()):
        inherited = ROLES[inheritor][1]
        if inheritor.startswith("virtio-"):
            inherited = GUEST_RAM + inherited
        who = f"{inheritor} backends" if inheritor.startswith("virtio-") else \
            f"{inheritor} threads"
        for entry in inherited:
            if all(not _same(entry, mine) for mine in entries):
                comment = f"({who}) " + entry["comment"]
                if inheritor.startswith("virtio-") and STAYS not in comment:
                    comment += (f" {STAYS}: a hot-plugged or restarted backend runs under "
                                f"this filter and its own, so each entry of its role "
                                f"({inheritor}) is here too; that role's record shows its "
                                "use.")
                entries = entries + [dict(entry, comment=comment)]
    return {"comment": f"{what} {DEFAULT_COMMENT}",
            "defaultAction": TRAP,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": entries}


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("names", "action", "args", "errnoRet"))


def main() -> None:
    for role in ROLES:
        text = json.dumps(profile(role), indent=2) + "\n"
        (HERE / f"{role}.json").write_text(text)


if __name__ == "__main__":
    main()
