"""The zygote: one pre-imported, privileged process per host that `stratovirt` asks to
fork its launcher, so a VM starts without importing anything and its processes share
the imported modules' memory with every other VM's.

Why: a VM of ours is three or more Python processes; each would import ~8 MiB of our
modules' heap and spend ~20 ms of its start doing it (docs/performance.md). Forked from
a process that imported them once and froze them (`gc.freeze()`), a launcher and the vm
process and backends it forks start with those pages shared copy-on-write, across VMs.
Android's zygote and Chrome's are the same idea.

It is optional and changes nothing about what a VM is: `stratovirt-zygote` runs as root
(a service); `stratovirt` looks for its socket (`/run/stratovirt/zygote.sock`, or
`$STRATOVIRT_ZYGOTE`; empty = never) and, if none answers or the zygote refuses, runs
the VM in its own process exactly as before. Through the zygote, the `stratovirt`
process stays as the VM's stand-in: it forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
SIGUSR1 and SIGUSR2 to the launcher, and exits with the launcher's status (or dies of
its signal); if it is killed, the zygote ends the VM with SIGTERM.

Trust (who may ask, and what the child may become), written down once here:
- The socket is the zygote's only input: mode 0600 in a 0700 directory, and a peer
  whose uid (SO_PEERCRED) is not the zygote's is dropped before a byte is read.
- The forked launcher becomes what the caller would have been, or is not forked
  (vmm/zygote/adopt.py): same uid, gids, groups, capability sets, no-new-privs, LSM
  label, root directory, namespaces, and no seccomp filter on the caller; it takes the
  caller's fds (by number, exactly those an exec would have kept), cwd, environment,
  argv, umask, resource limits, CPU affinity, nice value, oom_score_adj and cgroup
  (cgroup v2; under v1 only the same cgroups). Anything else is a refusal, and the
  caller runs the VM itself: the zygote only ever saves time, it never decides.
- A zygote whose code is older than the installed code (a module's mtime or size
  changed) refuses everyone, stops listening and exits once its VMs have ended.

What a user of it gives up: every VM forked from one zygote shares its address-space
layout and Python's hash secret (as Android's apps do); the launcher's
/proc/PID/cmdline is the zygote's; a cgroup move of the `stratovirt` process after the
start does not follow to the VM's processes; signals other than the six forwarded
(SIGSTOP, SIGCONT, SIGWINCH...) reach only the stand-in; the zygote itself is not
seccomp-confined (it does what a launcher does before its own filter: docs/seccomp.md),
nor is the stand-in (it holds one socket to the zygote and no guest input).
"""

DEFAULT_SOCKET = "/run/stratovirt/zygote.sock"
SOCKET_VARIABLE = "STRATOVIRT_ZYGOTE"
