"""Sweep grids without running a model: the shipped grids build valid configs, bad grids fail with an
error that names the problem, and the Pareto frontier / budget picks on hand-made results."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.arena_hard.sweep import PointResult, cheapest_reaching, load_grid, markdown_table, pareto_frontier, pick_for_budget, tally
from engine.config import load_config
from engine.summary import Summary
from actors.errors import ConfigError

GRIDS = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_point_of_a_shipped_grid_is_a_valid_config(path):
    grid = load_grid(path)
    points = grid.points()
    assert points[0][:2] == ("reference", "greedy") and len(points) > 1
    hashes = {load_config(grid.config, [*grid.set, *sets]).config_hash() for _, _, sets in points}
    assert len(hashes) == len(points), "two points of the grid are the same config"


def paper_rows(name: str) -> dict[tuple[str, str], tuple[object, float | None]]:
    """(axis, label) -> (the point's config, the paper's score) of a shipped grid."""
    grid = load_grid(name)
    return {(a, label): (load_config(grid.config, [*grid.set, *sets]), grid.paper(a, label)) for a, label, sets in grid.points()}


def test_figure2_grid_has_the_papers_axes_at_its_baseline():
    rows = paper_rows("figure2")
    assert [label for (axis, label) in rows if axis == "effective_feedback"] == ["1", "2", "4", "8", "16"]
    assert [label for (axis, label) in rows if axis == "responses"] == ["2", "4", "8", "16"]
    paper = {key: score for key, (_, score) in rows.items() if score is not None}
    assert paper == {
        ("responses", "2"): 89.0, ("responses", "16"): 90.2, ("effective_feedback", "2"): 87.0, ("effective_feedback", "16"): 89.0,
        ("edits", "2"): 88.4, ("edits", "16"): 89.6, ("best_of_n", "2"): 86.4, ("best_of_n", "16"): 88.5,
    }  # fmt: skip
    samples = {label: cfg.feedback.samples for (axis, label), (cfg, _) in rows.items() if axis == "effective_feedback"}
    assert samples == {"1": 16, "2": 16, "4": 16, "8": 32, "16": 64}  # the paper's 16 / 32 / 64 for 4 / 8 / 16
    cfg, _ = rows["edits", "16"]  # every axis leaves the other knobs at the baseline
    assert (cfg.generate.num_responses, cfg.feedback.samples, cfg.feedback.effective, cfg.feedback.sets) == (1, 10, None, "random")
    assert cfg.roles.get("generator").model.endswith("Llama-3.1-Nemotron-70B-Instruct-HF")


def test_table4_grid_is_the_papers_rows_at_the_baseline_setup():
    rows = paper_rows("table4")
    assert {label: score for (_, label), (_, score) in rows.items()} == {
        "greedy": 85.0, "self_feedback_self_edit": 84.6, "feedback_self_edit": 85.4, "feedback_edit_without_rl": 86.4,
        "edit_sft_without_feedback": 84.5, "feedback_edit": None,
    }  # fmt: skip
    for cfg, _ in rows.values():  # 1 greedy response, 10 feedback at 0.7, up to 3 at random, 1 greedy edit
        assert cfg.generate.num_responses == 1 and cfg.generate.temperature_for(1) == 0.0
        assert [(p.count, p.temperature) for p in cfg.feedback.plan] == [(10, 0.7)] and cfg.feedback.effective is None
        assert (cfg.feedback.sets, cfg.feedback.set_size, cfg.edit.edits_per_set) == ("random", 3, 1)
        assert cfg.roles.get("generator").model.endswith("Llama-3.1-Nemotron-70B-Instruct-HF")
    editor = {label: cfg.active_roles().get("editor") for (_, label), (cfg, _) in rows.items()}
    assert editor["feedback_self_edit"].model == editor["self_feedback_self_edit"].model == rows["reference", "greedy"][0].roles.generator.model
    assert editor["feedback_edit_without_rl"].model == editor["edit_sft_without_feedback"].model != editor["feedback_edit"].model
    assert rows["ablation", "edit_sft_without_feedback"][0].spec.edit == "without_feedback"


def test_table3_grid_compares_the_rewards_and_best_of_16():
    rows = paper_rows("table3")
    assert {label: score for (_, label), (_, score) in rows.items() if score is not None} == {"select": 92.7, "reward": 91.0, "best_of_16": 88.5}
    select, reward = rows["system", "select"][0], rows["system", "reward"][0]
    assert (select.generate.num_responses, select.feedback.effective) == (8, 16)
    assert reward.roles.reward.model.endswith("Llama-3.1-Nemotron-70B-Reward-HF") and reward.select == select.select
    assert rows["system", "best_of_16"][0].roles.reward.model == reward.roles.reward.model  # as configs/best_of_n_70b.yaml


def test_the_report_shows_the_papers_score_and_the_no_edit_rate():
    table = markdown_table([result("greedy", 50, 84.0, paper=85.0), result("fe", 400, 86.0, no_edit_rate=0.125)])
    header, _, greedy, fe = table.splitlines()
    assert [c.strip() for c in header.split("|")][3:5] == ["score", "paper"]
    assert "| 84.0  | 85.0  |" in greedy and "| 86.0  | n/a   |" in fe
    assert "| 12.5%   |" in fe and "| n/a     |" in greedy


def test_tally_adds_the_counts_of_a_resumed_point(tmp_path):
    cfg = load_config("feedback_edit")
    path = tmp_path / "counts" / "p.json"
    assert tally(path, cfg, None).no_edit_rate is None  # an old sweep: nothing counted
    assert tally(path, cfg, Summary("feedback_edit", "h", edits=4, edits_unchanged=1)).no_edit_rate == 0.25
    assert tally(path, cfg, Summary("feedback_edit", "h", edits=4, edits_unchanged=3)).no_edit_rate == 0.5
    assert tally(path, cfg, None).edits == 8  # answers all there: the saved counts


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("axes: {a: {key: generate.num_responses, values: [2]}}\nlimt: 3\n", "limt"),
        ("axes: {a: {values: [2]}}\n", "either `key` with `values`, or `points`"),
        ("axes: [\n", "invalid grid"),
        ("axes: {a: {key: generate.num_responses, values: [2], paper: {'4': 1.0}}}\n", "`paper` names no point of the axis: 4"),
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


def result(label: str, tokens: float, score: float | None, **extra) -> PointResult:
    return PointResult(
        axis="a", label=label, model_id=label, config_hash="0", questions=1, verdicts=2 if score is not None else 0,
        score=score, ci_low=None, ci_high=None, generated_tokens=tokens, tokens=tokens, tokens_vs_reference=None,
        latency_s=1.0, answer_tokens=tokens, **extra,
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
