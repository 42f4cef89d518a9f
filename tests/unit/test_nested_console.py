"""The nested rig's reading of L1's console (tests/framework/nested.py): which endings are
L1 breaking (worth its one rerun: L1 gone before the scenario's end, whatever it said)
and which are the scenario's own, and the heartbeat kept out of the output. Pure parsing: the rig's runs themselves are tests/nested/test_rig.py."""

import pytest

from tests.framework.nested import L1Broke, NestedError, _parse


def lines(*texts):
    return [(float(i), text) for i, text in enumerate(texts)]


def test_the_heartbeat_is_not_output():
    result = _parse(lines("boot", "NESTED-SCENARIO-BEGIN", "a", "NESTED-ALIVE", "b",
                          "NESTED-SCENARIO-END status=3"), 9.0, 0)
    assert (result.status, result.output) == (3, ["a", "b"])
    assert "NESTED-ALIVE" not in result.console


@pytest.mark.parametrize("panic", [
    "[   49.744756] Kernel panic - not syncing: corrupted stack end detected inside scheduler",
    "[  101.2] BUG: TASK stack guard page was hit at 00000000a1b2c3d4",
    "[  230.1] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [vmm-vm:131]",
])
def test_an_l1_kernel_failure_before_the_end_is_l1_breaking(panic):
    with pytest.raises(L1Broke):
        _parse(lines("NESTED-SCENARIO-BEGIN", "a", panic, "Rebooting in 1 seconds.."), 9.0, 0)


def test_an_l1_that_resets_without_a_word_is_l1_breaking():
    with pytest.raises(L1Broke):
        _parse(lines("NESTED-SCENARIO-BEGIN", "a"), 9.0, 0)


def test_an_l1_that_never_reached_the_scenario_is_l1_breaking():
    with pytest.raises(L1Broke):
        _parse(lines("nested: L1 up after 3.1 s"), 9.0, 0)


def test_a_failed_setup_is_not_rerun():
    with pytest.raises(NestedError) as caught:
        _parse(lines("NESTED-SETUP-FAILED: pip install of the project wheel"), 9.0, 0)
    assert not isinstance(caught.value, L1Broke)


def test_a_soft_lockup_in_a_scenario_that_ends_is_its_result():
    result = _parse(lines("NESTED-SCENARIO-BEGIN", "watchdog: BUG: soft lockup - CPU#0",
                          "NESTED-SCENARIO-END status=0"), 9.0, 0)
    assert result.status == 0
