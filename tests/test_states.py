"""The worker state table: what the master may do, and what it must never do."""

from __future__ import annotations

import pytest

from prefork.states import ALLOWED, IllegalTransition, WorkerState, check_transition

S = WorkerState


@pytest.mark.parametrize(("current", "new"), [
    (S.STOPPED, S.RUNNING), (S.RUNNING, S.BACKOFF), (S.BACKOFF, S.RUNNING),
    (S.RUNNING, S.STOPPING), (S.STOPPING, S.STOPPED), (S.RUNNING, S.FAILED),
    (S.RUNNING, S.EXITED), (S.BACKOFF, S.STOPPED), (S.BACKOFF, S.FAILED),
    # A worker the master stopped on its own: hung (backoff), replaced, removed, failed.
    (S.STOPPING, S.BACKOFF), (S.STOPPING, S.RUNNING), (S.STOPPING, S.FAILED),
    # Start order: waiting for the workers in its `after`, then started or stopped.
    (S.STOPPED, S.WAITING), (S.WAITING, S.RUNNING), (S.WAITING, S.STOPPED),
])
def test_the_lifecycle_transitions_are_allowed(current: WorkerState, new: WorkerState) -> None:
    check_transition(current, new)


@pytest.mark.parametrize(("current", "new"), [
    (S.FAILED, S.RUNNING), (S.EXITED, S.RUNNING), (S.STOPPING, S.EXITED),
    (S.STOPPED, S.STOPPING), (S.RUNNING, S.RUNNING), (S.BACKOFF, S.STOPPING),
    # Waiting is for a first start only: a worker that ran restarts without waiting.
    (S.RUNNING, S.WAITING), (S.BACKOFF, S.WAITING), (S.STOPPING, S.WAITING),
    (S.WAITING, S.STOPPING), (S.WAITING, S.EXITED), (S.FAILED, S.WAITING),
])
def test_impossible_transitions_raise(current: WorkerState, new: WorkerState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(current, new)


def test_every_state_has_a_row_and_final_states_lead_nowhere() -> None:
    assert set(ALLOWED) == set(WorkerState)
    assert ALLOWED[S.FAILED] == ALLOWED[S.EXITED] == frozenset()
