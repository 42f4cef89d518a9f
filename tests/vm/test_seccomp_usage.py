"""Minimality of the seccomp profiles, recorded: the host sessions of
tests/framework/seccomp_usage.py (the tiny guest with disks, QMP, serial on a terminal,
SIGTERM, stop/continue, daemon mode, many vCPUs; disk backends driven with real I/O)
run under strace, and every call each role's threads made under their filters is
judged against the profiles (vmm/sandbox/usage.py).

- No call falls outside a filter over it (the profiles are complete for these paths).
- Every entry no session used says in its comment why it stays: a path only a Linux
  guest takes (recorded by `scripts/seccomp_usage.py --nested`), or a reason of its own.
The results, with the nested run, are the table in docs/seccomp.md.
"""

import shutil

import pytest

from tests.framework import seccomp_usage as sessions
from vmm.sandbox import usage as recorder
from vmm.sandbox.profile import load

pytestmark = pytest.mark.needs_kvm


@pytest.fixture(scope="module")
def recorded():
    assert shutil.which("strace"), "strace is missing: scripts/setup.sh installs it"
    return sessions.record_host()


def test_every_session_ran_to_its_end(recorded):
    assert [run["session"] for run in recorded.runs] == list(sessions.HOST_SESSIONS)
    failed = [run for run in recorded.runs if run["status"] != 0]
    assert not failed, failed


def test_no_role_called_what_its_filters_do_not_allow(recorded):
    assert recorded.violations == []
    assert recorded.undetermined == []


@pytest.mark.parametrize("role", sessions.HOST_ROLES)
def test_the_role_was_recorded_under_its_filter(recorded, role):
    mine = recorded.roles.get(role)
    assert mine and mine.threads and mine.calls, f"no thread ran under the {role} filter"


@pytest.mark.parametrize("role", sessions.HOST_ROLES)
def test_every_entry_nothing_used_says_why_it_stays(recorded, role):
    unused = recorded.unused({role: load(role)})[role]
    silent = {key: why for key, why in unused.items() if not recorder.justified(why)}
    assert not silent, (f"{role}: entries no recorded call used, without a reason to stay "
                        f"(trim them in seccomp_profiles/generate.py or say why): {silent}")
