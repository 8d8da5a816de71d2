"""What `sluice rollout status` shows, without etcd."""

from __future__ import annotations

from datetime import datetime, timezone

from mesh.rollout.command import shown_weights, status_report
from mesh.rollout.document import parse_rollout_document


def test_status_shows_the_weights_a_rollback_writes_not_the_steps() -> None:
    base = {"model": "iris", "candidate": 3, "baseline": 2, "start_weights": {"1": 30, "2": 70}}
    running = parse_rollout_document({**base, "state": {"phase": "running", "step": 2}})
    # Version 1 keeps its 30 %: 25 % of the other 70 % (17.5 %) goes to the candidate.
    assert shown_weights(running) == {1: 60, 2: 105, 3: 35}
    waiting = parse_rollout_document({**base, "state": {"phase": "running", "step": 2, "finishing": "rolled_back",
                                                        "finishing_weights": {"1": 30, "2": 70, "3": 0}}})
    assert shown_weights(waiting) == {1: 30, 2: 70, 3: 0}
    done = parse_rollout_document({**base, "state": {"phase": "aborted", "step": 2}})
    report = status_report(done, datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert report["weights"] == {"1": 30, "2": 70, "3": 0}
