"""The serve load benchmark's core on a tiny scale, so that it keeps working: every row answers,
the ratio is computed, and clients that leave slow requests have their model calls cancelled."""

from __future__ import annotations

import pytest

from benchmarks.serve_load import run, table
from test_serve import free_port

pytestmark = pytest.mark.slow  # a Serve app and its pool start: about a minute on 2 cores


def test_serve_load_core_runs_on_a_tiny_scale(ray_session):
    result = run(clients=6, requests=2, cancel_clients=3, cancel_after_s=1.0, slow_s=30.0, port=free_port())
    raw, greedy, feedback_edit = result["rows"]
    assert raw["ok"] == raw["sent"] == 12
    assert greedy["ok"] == greedy["sent"] == 12 and greedy["other"] == 0  # 6 clients are far below the 503 threshold
    assert feedback_edit["ok"] == 12
    assert result["ratio"] > 0
    assert result["cancel"]["cancelled"] >= 3, result["cancel"]  # every abandoned call stopped, not held 30 s
    assert "cancellation" in table(result["rows"], result["cancel"], result["ratio"], 6)
    mix = result["mixed"]  # greedy, feedback_edit, hostile bodies and leavers at once
    assert mix["server_5xx"] == 0 and "hanging" not in mix["statuses"] and "no answer" not in mix["statuses"], mix
    assert set(mix["statuses"]) <= {"200", "400", "413", "503", "504", "left"} and mix["statuses"]["400"] == 6, mix
    assert mix["left"] == 6 and mix["cancelled"] >= 1, mix
