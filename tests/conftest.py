"""Test-run rules shared by every suite.

Tests marked needs_root or needs_kvm are skipped where the capability is missing; but a
skip of such a test on a machine that has it (because some other condition skipped it)
fails the whole run, so CI on a root machine with /dev/kvm can never pass by skipping.
"""

import os

import pytest

from tests.framework.host import kvm_usable

_missed: list[str] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("needs_root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))
        if item.get_closest_marker("needs_kvm") and not kvm_usable():
            item.add_marker(pytest.mark.skip(reason="needs a usable /dev/kvm"))


def pytest_runtest_logreport(report):
    if not report.skipped:
        return
    if "needs_root" in report.keywords and os.geteuid() == 0:
        _missed.append(f"{report.nodeid} (needs root; running as root)")
    if "needs_kvm" in report.keywords and kvm_usable():
        _missed.append(f"{report.nodeid} (needs /dev/kvm; /dev/kvm is usable)")


def pytest_sessionfinish(session, exitstatus):
    if _missed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _missed:
        terminalreporter.section("skipped although the capability is here", sep="!")
        for line in _missed:
            terminalreporter.write_line(line)
