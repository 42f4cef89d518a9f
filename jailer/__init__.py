"""The jailer: chroot, namespaces, cgroups, uid/gid and rlimits for a VMM, then exec.

Planned (design.md); nothing here yet. The launcher in vmm/ does not depend on it.
"""
