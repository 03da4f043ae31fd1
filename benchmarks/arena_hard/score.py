"""Arena Hard scores: arena-hard-auto's `show_result.py`, both versions, reproduced exactly.

v0.1 (the paper's numbers; arena-hard-auto's show_result.py up to 2024-09): each judged game is a
battle between the baseline (model_a) and a model (model_b); a `>>` verdict counts as `weight` (3)
battles, a tie as half a win for each side (the battles are duplicated: a tie is a baseline win in
the first copy and a loss in the second). Bradley-Terry ratings are the unpenalized logistic
regression over those battles (Elo scale 400, anchored so the baseline is 1000), the score is the
predicted win rate against the baseline (so the baseline is 50%), and the 95% CI takes the 2.5 / 97.5
percentiles of 100 bootstrap rounds that resample the battles with numpy's seed 42 (arena-hard-auto
seeds numpy at import; fescale uses its own `RandomState(seed)`, the same stream).

v2.0 (show_result.py since 2025-04): per category, the score is the mean of the per-battle outcomes
(same weights), with 100 per-model bootstrap rounds; score = mean of the rounds, CI = their 5% / 95%
quantiles (arena-hard-auto leaves numpy unseeded there; fescale seeds it).

Example (two questions: the baseline wins 3 battles, the model 1, and one tie -> 1.5 / 6 = 25%):
    >>> from benchmarks.arena_hard.formats import Game, Judgment
    >>> js = [Judgment("q1", "m", "judge", (Game("A>>B"), Game("A>B")), "v0.1"),
    ...       Judgment("q2", "m", "judge", (Game("A=B"), Game("B>A")), "v0.1")]
    >>> [(s.model, s.score) for s in score_judgments(js, "base")]
    [('base', 50.0), ('m', 25.0)]
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from benchmarks.arena_hard.formats import Judgment, read_answers, read_judgments
from actors.errors import InputError

WEIGHT = 3  # battles per `>>` verdict
ROUNDS = 100
SEED = 42
SCALE, BASE, INIT_RATING = 400, 10, 1000
SEPARATED = 100 * SCALE  # rating gap standing in for "won every battle": a win rate of 100.00%
# v0.1 game 1 has the baseline as A: label -> (the baseline's outcome, battles); game 2 mirrors it.
_V01_LABELS = {"A>B": (1.0, 1), "A>>B": (1.0, WEIGHT), "A=B": (0.5, 1), "B>A": (0.0, 1), "B>>A": (0.0, WEIGHT)}
# v2.0: label -> the outcomes of assistant A (one per battle), as in its show_result.py
_V20_LABELS = {
    "A>B": [1], "A>>B": [1] * WEIGHT, "A=B": [0.5], "A<<B": [0] * WEIGHT, "A<B": [0],
    "B>A": [0], "B>>A": [0] * WEIGHT, "B=A": [0.5], "B<<A": [1] * WEIGHT, "B<A": [1],
}  # fmt: skip


@dataclass(frozen=True)
class ModelScore:
    """One leaderboard row; score and CI bounds are win rates against the baseline, in percent."""

    model: str
    score: float
    ci_low: float
    ci_high: float
    avg_tokens: int | None = None  # mean token_len of the model's answers (None: no answer file)
    battles: int = 0


@dataclass(frozen=True)
class Battles:
    """Battles of the baseline (model_a) against each model (model_b), in file order."""

    model: np.ndarray  # model_b's name per battle
    outcome: np.ndarray  # the baseline's result: 1 win, 0.5 tie, 0 loss


# -- v0.1: Bradley-Terry ---------------------------------------------------------------------------


def battles_v01(judgments: list[Judgment], weight: int = WEIGHT) -> Battles:
    """Battles of v0.1 judgments; a game without a verdict (or an unknown label) gives none."""
    labels = {k: (o, weight if n > 1 else 1) for k, (o, n) in _V01_LABELS.items()}
    models, outcomes = [], []
    for j in judgments:
        for game_index, game in enumerate(j.games[:2]):
            if game is None or game.score not in labels:
                continue
            outcome, count = labels[game.score]
            if game_index == 1:
                outcome = 1.0 - outcome  # positions swapped: A is the model
            models += [j.model] * count
            outcomes += [outcome] * count
    return Battles(np.array(models, dtype=object), np.array(outcomes, dtype=float))


def bradley_terry(battles: Battles, baseline: str) -> dict[str, float]:
    """Elo-scale Bradley-Terry ratings (baseline = 1000): arena-hard-auto's `compute_mle_elo`.

    Unpenalized logistic regression without intercept over the battles duplicated (a tie is a
    baseline win in one copy and a loss in the other). A model that wins (or loses) every battle has
    no finite maximum; the solver stops at a very large rating, i.e. a win rate of ~100% (or ~0%);
    when every battle went one way (no class to fit against) the ratings are `SEPARATED` apart.
    """
    order = [baseline] + [m for m in dict.fromkeys(battles.model) if m != baseline]
    if len(set(battles.outcome >= 0.5) | set(battles.outcome == 1.0)) == 1:
        # no ties and one side won every battle (small bootstrap samples): no finite maximum
        sign = 1.0 if battles.outcome[0] == 1.0 else -1.0
        return {m: INIT_RATING if m == baseline else INIT_RATING - sign * SEPARATED for m in order}
    column = {m: i for i, m in enumerate(order)}
    # The duplicated battles hold only 2 distinct rows per model (baseline won the copy or not):
    # fit those with their counts as sample weights, the same loss as one row per battle, and fast.
    index = np.array([column[m] for m in battles.model], dtype=int)
    won = np.concatenate([battles.outcome >= 0.5, battles.outcome == 1.0]).astype(int)
    counts = np.bincount(2 * np.concatenate([index, index]) + won, minlength=2 * len(order))
    keys = np.flatnonzero(counts)  # 2 * model column + (the baseline won this copy)
    x = np.zeros([len(keys), len(order)])
    x[:, column[baseline]] = +math.log(BASE)
    x[np.arange(len(keys)), keys // 2] = -math.log(BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the separable case above
        lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-8)  # C=inf: sklearn's penalty=None
        lr.fit(x, (keys % 2).astype(float), sample_weight=counts[keys].astype(float))
    ratings = SCALE * lr.coef_[0] + INIT_RATING
    ratings += INIT_RATING - ratings[column[baseline]]
    return dict(zip(order, ratings.tolist()))


def win_rate(rating: float, baseline_rating: float) -> float:
    """Percent chance to beat the baseline, rounded to 0.01 as arena-hard-auto's `get_win_rate_column`."""
    return round(100.0 / (1.0 + BASE ** ((float(baseline_rating) - float(rating)) / SCALE)), 2)


def _score_v01(judgments: list[Judgment], baseline: str, rounds: int, rs: np.random.RandomState, weight: int) -> list[ModelScore]:
    """The v0.1 rows, the baseline's included, in no order and without average tokens."""
    battles = battles_v01(judgments, weight)
    if len(battles.model) == 0:
        raise InputError("no judged games with a verdict: nothing to score")
    n = len(battles.model)
    with threadpool_limits(1):  # tiny fits: BLAS threads only add contention (10x slower on 2 cores)
        ratings = bradley_terry(battles, baseline)
        boot = []
        for _ in tqdm(range(rounds), desc="bootstrap", unit="round", leave=False, disable=rounds < 20):
            idx = rs.choice(n, size=n, replace=True)  # what pandas' `battles.sample(frac=1, replace=True)` draws
            boot.append(bradley_terry(Battles(battles.model[idx], battles.outcome[idx]), baseline))
    rows = []
    for model, rating in ratings.items():
        samples = np.array([b.get(model, np.nan) for b in boot])
        base_samples = np.array([b[baseline] for b in boot])
        rows.append(
            ModelScore(
                model=model,
                score=win_rate(rating, ratings[baseline]),
                ci_low=win_rate(np.percentile(samples, 2.5), np.percentile(base_samples, 2.5)),
                ci_high=win_rate(np.percentile(samples, 97.5), np.percentile(base_samples, 97.5)),
                battles=int((battles.model == model).sum()) if model != baseline else n,
            )
        )
    return rows


# -- v2.0: bootstrapped mean ------------------------------------------------------------------------


def _score_v20(
    judgments: list[Judgment], baseline: str, category: str, rounds: int, rs: np.random.RandomState, weight: int
) -> list[ModelScore]:
    """The v2.0 rows of one category (the baseline added at 50%), in no order and without average tokens."""
    labels = {k: v[:1] * (weight if len(v) > 1 else 1) for k, v in _V20_LABELS.items()}
    outcomes: dict[str, list[float]] = {}
    for j in judgments:
        if j.category != category:
            continue
        if len(j.games) < 2 or any(g is None or g.score is None for g in j.games[:2]):
            continue  # show_result drops the question when either game has no verdict
        g1, g2 = j.games[0].score, j.games[1].score
        for label in (g1, g2):
            if label not in labels:
                raise InputError(f"judgment of {j.model} on {j.question_id}: unknown verdict label {label!r}")
        model = j.model.split("/")[-1]
        outcomes.setdefault(model, []).extend(labels[g2] + [1 - s for s in labels[g1]])
    if not outcomes:
        raise InputError(f"no judged questions with two verdicts in category {category!r}")
    models = sorted(outcomes)
    arrays = {m: np.array(outcomes[m], dtype=float) for m in models}
    boot = {m: [] for m in models}
    for _ in range(rounds):
        for m in models:  # pandas' groupby(model).sample draws the groups in sorted order
            a = arrays[m]
            boot[m].append(a[rs.choice(len(a), size=len(a), replace=True)].mean())
    rows = [
        ModelScore(
            model=m,
            score=round(100 * float(np.mean(boot[m])), 2),
            ci_low=round(100 * float(np.quantile(boot[m], 0.05)), 2),
            ci_high=round(100 * float(np.quantile(boot[m], 0.95)), 2),
            battles=len(arrays[m]),
        )
        for m in models
    ]
    return [*rows, ModelScore(baseline, 50.0, 50.0, 50.0)]


# -- either version ---------------------------------------------------------------------------------


def score_judgments(
    judgments: list[Judgment],
    baseline: str,
    category: str | None = None,
    avg_tokens: dict[str, int] | None = None,
    *,
    rounds: int = ROUNDS,
    seed: int = SEED,
    weight: int = WEIGHT,
) -> list[ModelScore]:
    """The leaderboard (baseline included at 50%), best first: v0.1's Bradley-Terry over all the
    judgments when `category` is None, else v2.0's bootstrapped mean over that category's.

    One entry point for both versions, so callers that only know the version at run time (a
    judgment directory, a sweep's questions) pick it with an argument, not with a second call.
    """
    rs = np.random.RandomState(seed)
    if category is None:
        rows = _score_v01(judgments, baseline, rounds, rs, weight)
    else:
        rows = _score_v20(judgments, baseline, category, rounds, rs, weight)
    tokens = avg_tokens or {}
    return sorted((replace(r, avg_tokens=tokens.get(r.model)) for r in rows), key=lambda r: (-r.score, r.model))


# -- leaderboard files and tables -------------------------------------------------------------------


def average_tokens(answer_dir: str | Path) -> dict[str, int]:
    """model (the answer file's name, as arena-hard-auto keys it) -> int(mean token_len)."""
    out = {}
    for path in sorted(Path(answer_dir).glob("*.jsonl")):
        answers = read_answers(path)
        if answers:
            out[path.stem] = int(sum(a.token_len for a in answers.values()) / len(answers))
    return out


def score_dir(
    judgment_dir: str | Path,
    baseline: str | None = None,
    answer_dir: str | Path | None = None,
    category: str | None = None,
    rounds: int = ROUNDS,
    seed: int = SEED,
) -> list[ModelScore]:
    """Score a `model_judgment/<judge>/` directory of either version (found from its rows).

    `answer_dir` defaults to arena-hard-auto's layout, `<judgment_dir>/../../model_answer`.
    v0.1 needs `baseline` (default gpt-4-0314); v2.0 takes it from the rows when not given.
    """
    judgments = read_judgments(judgment_dir)
    if answer_dir is None:
        guess = Path(judgment_dir).resolve().parent.parent / "model_answer"
        answer_dir = guess if guess.is_dir() else None
    tokens = average_tokens(answer_dir) if answer_dir else None
    if judgments[0].version == "v0.1":
        category, baseline = None, baseline or "gpt-4-0314"
    else:
        category = category or "hard_prompt"
        named = {j.baseline for j in judgments if j.category == category and j.baseline}
        if baseline is None:
            if len(named) != 1:
                raise InputError(f"category {category!r} names baselines {sorted(named)}; pass --baseline")
            baseline = named.pop()
    return score_judgments(judgments, baseline, category, tokens, rounds=rounds, seed=seed)


def leaderboard_json(scores: list[ModelScore]) -> dict[str, dict]:
    """`{model: {score, ci_low, ci_high, avg_tokens}}` (percent, absolute bounds)."""
    return {s.model: {k: v for k, v in asdict(s).items() if k not in ("model", "battles")} for s in scores}


def write_leaderboard(scores: list[ModelScore], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(leaderboard_json(scores), indent=2) + "\n")


def leaderboard_lines(scores: list[ModelScore]) -> list[str]:
    """show_result.py's own lines: `model | score: 37.9 | 95% CI: (-2.3, 2.5) | average #tokens: 354`."""
    lines = []
    for s in scores:
        interval = str((round(s.ci_low - s.score, 1), round(s.ci_high - s.score, 1)))
        tokens = "" if s.avg_tokens is None else f" | average #tokens: {s.avg_tokens}"
        lines.append(f"{s.model : <30} | score: {round(s.score, 1) : ^5} | 95% CI: {interval : ^12}{tokens}")
    return lines


def leaderboard_markdown(scores: list[ModelScore]) -> str:
    from engine.summary import format_table

    rows = [
        (s.model, f"{s.score:.1f}", f"({s.ci_low:.1f}, {s.ci_high:.1f})", "" if s.avg_tokens is None else str(s.avg_tokens))
        for s in scores
    ]
    return format_table(["model", "score (%)", "95% CI", "avg tokens"], rows)
