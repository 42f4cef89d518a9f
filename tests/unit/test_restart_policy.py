"""The restart policy (vmm/restart.py) as the launcher asks it: at once, then backoff;
at most `restarts` in any window; the death after that fails the device; an unplugged
slot starts afresh. Times are given, not waited for."""

from vmm.config.model import BackendRestart
from vmm.restart import BACKOFF, BACKOFF_CAP, RestartPolicy


def test_the_first_death_is_restarted_at_once_then_backoff_doubles():
    policy = RestartPolicy(BackendRestart(restarts=5, window=60))
    delays = [policy.died(0, now) for now in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert delays == [0.0, BACKOFF, 2 * BACKOFF, 4 * BACKOFF, 8 * BACKOFF]
    assert policy.restarts(0) == 5


def test_the_sixth_death_within_the_window_fails_the_device():
    policy = RestartPolicy(BackendRestart(restarts=5, window=60))
    for now in range(5):
        assert policy.died(3, float(now)) is not None
    assert policy.died(3, 59.0) is None
    assert policy.restarts(3) == 5


def test_deaths_older_than_the_window_no_longer_count():
    policy = RestartPolicy(BackendRestart(restarts=2, window=10))
    assert policy.died(1, 0.0) == 0.0
    assert policy.died(1, 5.0) == BACKOFF
    assert policy.died(1, 10.5) == BACKOFF      # the one at 0 left the window
    assert policy.died(1, 30.0) == 0.0          # all gone: at once again
    assert policy.restarts(1) == 4


def test_backoff_is_capped():
    policy = RestartPolicy(BackendRestart(restarts=100, window=3600))
    delays = [policy.died(0, float(now)) for now in range(30)]
    assert max(delays) == BACKOFF_CAP and delays[-1] == BACKOFF_CAP


def test_slots_are_counted_apart_and_an_unplugged_one_starts_afresh():
    policy = RestartPolicy(BackendRestart(restarts=1, window=60))
    assert policy.died(0, 0.0) == 0.0
    assert policy.died(6, 0.0) == 0.0
    assert policy.died(0, 1.0) is None
    policy.forget(0)
    assert policy.restarts(0) == 0 and policy.died(0, 2.0) == 0.0


def test_no_restarts_means_the_first_death_fails():
    policy = RestartPolicy(BackendRestart(restarts=0, window=60))
    assert policy.died(0, 0.0) is None
