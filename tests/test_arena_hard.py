"""Arena Hard scoring, verdict parsing and file formats (pure: no Ray, no model).

The scorer is checked three ways: against hand-computed Bradley-Terry cases, against a faithful
copy of arena-hard-auto's own show_result.py (`arena_hard_reference.py`) on the real gpt-4-1106-preview
judgments in ../shared/arena-hard-v0.1, and against the numbers that copy printed there.
"""

from __future__ import annotations

import json

import pytest
from threadpoolctl import threadpool_limits

from arena_hard_reference import show_result_v01, show_result_v20
from benchmarks.arena_hard.formats import Answer, Game, ITSCost, Judgment, Question, read_answers, read_judgments, read_questions
from benchmarks.arena_hard.judge import parse_verdict
from benchmarks.arena_hard.score import leaderboard_json, score_dir, score_judgments
from conftest import SHARED
from cli.main import main
from actors.errors import InputError

ARENA = SHARED / "arena-hard-v0.1"
JUDGE_DIR = ARENA / "model_judgment" / "gpt-4-1106-preview"
needs_shared = pytest.mark.skipif(not JUDGE_DIR.is_dir(), reason="needs ../shared/arena-hard-v0.1")


def judgment(qid: str, model: str, g1: str | None, g2: str | None) -> Judgment:
    return Judgment(qid, model, "judge", (Game(g1), Game(g2)), "v0.1")


# -- hand-computed Bradley-Terry ------------------------------------------------------------------


def test_bt_weights_and_ties_by_hand():
    """Against the baseline only, BT's win rate is the weighted win fraction.

    q1: game 1 A>>B (baseline wins, x3), game 2 A>B (positions swapped: the model wins, x1);
    q2: A=B (half each), B>A in game 2 (the baseline wins). Model: 1 + 0.5 of 6 battles = 25%.
    """
    scores = {s.model: s for s in score_judgments([judgment("q1", "m", "A>>B", "A>B"), judgment("q2", "m", "A=B", "B>A")], "base")}
    assert scores["m"].score == pytest.approx(25.0, abs=0.01)
    assert scores["m"].battles == 6
    assert (scores["base"].score, scores["base"].ci_low, scores["base"].ci_high) == (50.0, 50.0, 50.0)


def test_bt_two_models_strong_verdicts_count_three_times():
    """m1: game 1 B>>A (m1 wins x3), game 2 B>A (positions swapped: the baseline wins x1) -> 3/4 = 75%.
    m2: game 1 A=B (a tie); game 2 `B=A` is not a v0.1 label (no battle) -> one tie -> 50%."""
    js = [judgment("q1", "m1", "B>>A", "B>A"), judgment("q1", "m2", "A=B", "B=A")]
    scores = {s.model: s for s in score_judgments(js, "base", rounds=20)}
    assert scores["m1"].score == pytest.approx(75.0, abs=0.01)
    assert scores["m2"].score == pytest.approx(50.0, abs=0.01)
    assert scores["m2"].battles == 1
    assert [s.model for s in score_judgments(js, "base", rounds=5)][0] == "m1"


def test_bt_model_that_always_wins_and_missing_verdicts():
    """A model that wins every battle has no finite rating: its win rate is ~100%, CI included.
    A game without a verdict is no battle; the other game of its question still counts."""
    js = [judgment(f"q{i}", "champ", "B>>A", "A>B") for i in range(5)] + [judgment("q9", "m", None, "A>B")]
    scores = {s.model: s for s in score_judgments(js, "base", rounds=10)}
    assert scores["champ"].score > 99.9 and scores["champ"].ci_low > 99.9
    assert scores["m"].battles == 1 and scores["m"].score > 99.9


def test_bootstrap_is_deterministic_and_seeded():
    js = [judgment(f"q{i}", "m", ["A>B", "B>A", "A=B", "B>>A"][i % 4], ["B>A", "A>B", "A>>B", "A=B"][i % 3]) for i in range(40)]
    a, b = score_judgments(js, "base", rounds=30), score_judgments(js, "base", rounds=30)
    assert a == b
    other = score_judgments(js, "base", rounds=30, seed=7)
    assert [s.score for s in other] == [s.score for s in a]  # the point estimate does not depend on the seed
    m = next(s for s in a if s.model == "m")
    assert m.ci_low < m.score < m.ci_high


def test_v20_mean_scores_by_hand():
    """v2.0 scores the bootstrapped mean outcome. m: game 1 B>>A (the baseline, A, loses: 3 wins),
    game 2 A>B (A is the model: 1 win) -> always 100%. t: ties only -> 50%. A question with a
    null game is dropped whole; model paths are stripped to their last part."""
    js = [
        Judgment("u1", "org/m", "judge", (Game("B>>A"), Game("A>B")), "v2.0", "hard_prompt", "base"),
        Judgment("u2", "org/m", "judge", (Game(None), Game("B>>A")), "v2.0", "hard_prompt", "base"),
        Judgment("u1", "t", "judge", (Game("A=B"), Game("B=A")), "v2.0", "hard_prompt", "base"),
        Judgment("u1", "other", "judge", (Game("A>B"), Game("A>B")), "v2.0", "creative_writing", "base"),
    ]
    scores = {s.model: s for s in score_judgments(js, "base", "hard_prompt", rounds=10)}
    assert set(scores) == {"m", "t", "base"}
    assert (scores["m"].score, scores["m"].ci_low, scores["m"].ci_high, scores["m"].battles) == (100.0, 100.0, 100.0, 4)
    assert scores["t"].score == 50.0 and scores["base"].score == 50.0


# -- arena-hard-auto's own show_result.py on the real judgments -----------------------------------


@needs_shared
def test_v01_matches_show_result_on_real_judgments(tmp_path):
    """fescale's scores and CIs equal show_result.py's (v0.1) on the five real gpt-4-1106-preview judgment files."""
    with threadpool_limits(1):
        expected = show_result_v01(str(ARENA), "gpt-4-1106-preview")
    out = tmp_path / "scores.json"
    assert main(["bench", "arena-hard", "show", "--judgment-dir", str(JUDGE_DIR), "--baseline", "gpt-4-0314", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got) == set(expected)
    for model, e in expected.items():
        for key in ("score", "ci_low", "ci_high"):
            assert got[model][key] == pytest.approx(e[key], abs=0.011), (model, key)
        assert got[model]["avg_tokens"] == e["avg_tokens"]
    # what that copy of show_result.py printed here (sorted files, seed 42)
    assert got["gpt-4-0613"] == {"score": 37.9, "ci_low": 35.84, "ci_high": 40.28, "avg_tokens": 354}
    assert got["gpt-3.5-turbo-0125"]["score"] == 23.34 and got["gpt-4-0314"]["score"] == 50.0


@needs_shared
def test_v20_matches_show_result_on_real_judgments_in_v20_layout(tmp_path):
    """The same verdicts in v2.0 rows (uid, category, baseline): scores equal v2.0 show_result.py's (to 0.1)."""
    judge_dir = tmp_path / "model_judgment" / "gpt-4-1106-preview"
    judge_dir.mkdir(parents=True)
    for j in read_judgments(JUDGE_DIR):
        v2 = Judgment(j.question_id, j.model, j.judge, j.games, "v2.0", "hard_prompt", "gpt-4-0314")
        with open(judge_dir / f"{j.model}.jsonl", "a") as f:
            f.write(json.dumps(v2.to_row()) + "\n")
    expected = show_result_v20(str(tmp_path), "gpt-4-1106-preview", "gpt-4-0314")
    got = leaderboard_json(score_dir(judge_dir))
    for model, (score, low, high) in expected.items():
        assert (got[model]["score"], got[model]["ci_low"], got[model]["ci_high"]) == pytest.approx((score, low, high), abs=0.006), model


# -- verdict parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, label, retry",
    [
        ("My final verdict is: Assistant B is slightly better: [[B>A]]", "B>A", False),
        ("I think A is better overall.", None, True),  # no label: ask to continue
        ("Verdict [[A>B]]. On reflection: [[B>>A]]", None, False),  # two different labels: no verdict, no retry
        ("[[A=B]] ... as I said, [[A=B]]", "A=B", False),  # the same label twice is one verdict
        ("```\nMy final verdict is [[A>>B]]\n```", "A>>B", False),  # inside a code block still counts
        ("Single brackets [A>B] are not the v0.1 label", None, True),
        ("[[]] and [[C>D]]", None, True),
    ],
)
def test_parse_verdict(text, label, retry):
    v = parse_verdict(text)
    assert (v.label, v.retry) == (label, retry)


# -- file formats -----------------------------------------------------------------------------------


@needs_shared
def test_formats_round_trip_arena_hard_auto_files():
    """Real v0.1 questions, answers and judgments read and written back unchanged (key by key)."""
    lines = (ARENA / "question.jsonl").read_text().splitlines()[:20]
    for line, q in zip(lines, [Question.from_row(json.loads(x)) for x in lines]):
        assert q.to_row() == json.loads(line)
    assert len(read_questions(ARENA / "question.jsonl")) == 500
    first = json.loads((ARENA / "model_answer" / "gpt-4-0314.jsonl").read_text().splitlines()[0])
    assert Answer.from_row(first).to_row() == first
    row = json.loads((JUDGE_DIR / "gpt-4-0613.jsonl").read_text().splitlines()[0])
    written = Judgment.from_row(row).to_row()
    assert {k: written[k] for k in row if k != "games"} == {k: v for k, v in row.items() if k != "games"}
    assert [g["score"] for g in written["games"]] == [g["score"] for g in row["games"]]


def test_v20_formats_round_trip_and_fescale_costs(tmp_path):
    q = {"uid": "u1", "category": "hard_prompt", "subcategory": "coding", "prompt": "Write a zig program"}
    assert Question.from_row(q).to_row() == q
    cost = ITSCost(tokens=900, generated_tokens=300, latency_s=1.5, mode="feedback_edit", config_hash="abc")
    a = Answer("u1", "m", "# Title\n- item\n**bold**", 9, "v2.0", prompt="Write a zig program", cost=cost)
    row = a.to_row()
    assert row["messages"] == [{"role": "user", "content": "Write a zig program"}, {"role": "assistant", "content": {"answer": a.text}}]
    assert row["metadata"]["header_count"]["h1"] == 1 and row["metadata"]["list_count"]["unordered"] == 1
    assert row["metadata"]["bold_count"]["**"] == 1 and row["metadata"]["token_len"] == 9
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n")
    back = read_answers(path)["u1"]
    assert back == a
    j = Judgment("u1", "m", "gpt-4.1", (Game("A>B", "the prompt", "text [[A>B]]"), None), "v2.0", "hard_prompt", "o3-mini")
    assert Judgment.from_row(j.to_row()) == j


def test_malformed_files_name_file_and_line(tmp_path):
    bad = tmp_path / "question.jsonl"
    bad.write_text('{"question_id": "q1", "turns": [{"content": "hi"}]}\n{not json\n')
    with pytest.raises(InputError, match=r"question.jsonl:2: not valid JSON"):
        read_questions(bad)
    bad.write_text('{"question_id": "q1", "turns": []}\n')
    with pytest.raises(InputError, match=r"question.jsonl:1: `turns` must be a non-empty list"):
        read_questions(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_questions(tmp_path / "missing.jsonl")
    empty = tmp_path / "judgments"
    empty.mkdir()
    with pytest.raises(InputError, match="no \\*.jsonl judgment files"):
        read_judgments(empty)
