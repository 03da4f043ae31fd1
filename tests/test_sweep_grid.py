"""Sweep grids without running a model: the shipped grids build valid configs, bad grids fail with an
error that names the problem, and the Pareto frontier / budget picks on hand-made results."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.arena_hard.sweep import PointResult, cheapest_reaching, load_grid, pareto_frontier, pick_for_budget
from engine.config import load_config
from actors.errors import ConfigError

GRIDS = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_point_of_a_shipped_grid_is_a_valid_config(path):
    grid = load_grid(path)
    points = grid.points()
    assert points[0][:2] == ("reference", "greedy") and len(points) > 1
    hashes = {load_config(grid.config, [*grid.set, *sets]).config_hash() for _, _, sets in points}
    assert len(hashes) == len(points), "two points of the grid are the same config"


def test_figure2_grid_has_the_papers_axes():
    grid = load_grid(GRIDS[[p.stem for p in GRIDS].index("figure2")])
    assert {"responses", "effective_feedback", "edits", "best_of_n"} <= set(grid.axes)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("axes: {a: {key: generate.num_responses, values: [2]}}\nlimt: 3\n", "limt"),
        ("axes: {a: {values: [2]}}\n", "either `key` with `values`, or `points`"),
        ("axes: [\n", "invalid grid"),
    ],
)
def test_a_bad_grid_names_what_is_wrong(tmp_path, text, match):
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_grid(tmp_path / "g.yaml")


def test_a_missing_grid_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")


def test_grid_paths_are_relative_to_the_grid_file_also_when_set(tmp_path):
    (tmp_path / "q.jsonl").write_text("")
    (tmp_path / "g.yaml").write_text("questions: q.jsonl\naxes: {a: {key: generate.num_responses, values: [2]}}\n")
    assert load_grid(tmp_path / "g.yaml").questions == str(tmp_path / "q.jsonl")
    grid = load_grid(tmp_path / "g.yaml", ["questions=missing.jsonl", "baseline_answers=q.jsonl", "limit=2"])
    assert (grid.questions, grid.baseline_answers, grid.limit) == ("missing.jsonl", str(tmp_path / "q.jsonl"), 2)


def test_a_wrong_config_key_in_a_point_is_named(tmp_path):
    (tmp_path / "g.yaml").write_text("config: greedy\naxes: {a: {key: generate.num_respones, values: [2]}}\n")
    grid = load_grid(tmp_path / "g.yaml")
    (_, _, sets) = grid.points()[1]
    with pytest.raises(ConfigError, match="num_respones"):
        load_config(grid.config, [*grid.set, *sets])


def result(label: str, tokens: float, score: float | None) -> PointResult:
    return PointResult(
        axis="a", label=label, model_id=label, config_hash="0", questions=1, verdicts=2 if score is not None else 0,
        score=score, ci_low=None, ci_high=None, generated_tokens=tokens, tokens=tokens, tokens_vs_reference=None,
        latency_s=1.0, answer_tokens=tokens,
    )


def test_pareto_frontier_and_budget_picks():
    points = [result("greedy", 50, 40.0), result("bon2", 100, 38.0), result("fe", 400, 55.0), result("fe16", 800, 55.0), result("dud", 60, None)]
    assert [r.label for r in pareto_frontier(points)] == ["greedy", "fe"]
    assert pick_for_budget(points, 399).label == "greedy"
    assert pick_for_budget(points, 10_000).label == "fe"  # same score, fewer tokens
    assert pick_for_budget(points, 10) is None
    assert cheapest_reaching(points, 39).label == "greedy"
    assert cheapest_reaching(points, 50).label == "fe"
    assert cheapest_reaching(points, 90) is None
