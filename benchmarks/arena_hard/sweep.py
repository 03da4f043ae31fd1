"""Scaling sweeps: a grid over config keys, each point answered, judged and scored on Arena Hard.

A grid file names a base config, the questions, the baseline answers, the judge and its axes:

    name: figure2
    config: feedback_edit                  # preset or YAML path; `set` overrides it for every point
    set: [generate.max_tokens=2048]
    questions: data/arena-hard-v0.1/question.jsonl
    baseline_answers: data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl
    judge: gpt-4-1106-preview              # a preset in configs/judges/, a path, or an inline judge config
    reference: [mode=greedy]               # the point tokens are relative to (default: greedy)
    axes:
      responses:                           # one axis: a key and its values ...
        key: generate.num_responses
        values: [2, 4, 8, 16]
        set: [feedback.effective=2]        # ... plus overrides of this axis only
        paper: {"16": 90.2}                # optional: the paper's score of a point, shown beside ours
      scorer:                              # ... or named points, each a list of overrides
        points: {logit_judge: [select.scorer=logit_judge], generative: [select.scorer=generative]}
    reference_paper: 85.0                  # optional: the paper's score of the reference

The file loads like every fescale config (`engine.config_kit`): strict keys, one error format, and
`fescale sweep --set KEY=VALUE` overrides its keys (e.g. `limit=4`, `config=greedy`).

Each point lives in `<out>/data/` in arena-hard-auto's layout (`model_answer/<id>.jsonl`,
`model_judgment/<judge>/<id>.jsonl`) under an id that carries its config hash, so a rerun reuses
every answer and judgment already made (also of points shared by several axes) and a changed point
gets a new id. Points with the same role pools reuse the running pools. Output: `sweep.json`,
`sweep.md` (score, the paper's score where the grid gives it, 95% CI, generated tokens per answer
and relative to the reference, latency, no-edit rate), `scaling.png` (score vs tokens, log2, one
line per axis, CI bars, the paper's scores as crosses: its Figure 2) and `pareto.png` (the frontier
of score vs compute). The no-edit rate (`engine.method.no_edits`) comes from the run summaries of
the point's answer runs, added up in `<out>/data/counts/<id>.json` (a resumed point answers only
the questions left).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, model_validator

from actors.errors import ConfigError
from engine.config import CONFIGS_DIR, FescaleConfig
from engine.config_kit import StrictModel, load, resolve
from engine.summary import COUNTED, Summary, format_table, percent

log = logging.getLogger("fescale")
REFERENCE_AXIS = "reference"


class AxisSpec(StrictModel):
    key: str | None = Field(None, description="the config key this axis varies")
    values: list[Any] = Field(default_factory=list, description="its values, one point each")
    points: dict[str, list[str]] = Field(default_factory=dict, description="named points: label -> overrides")
    set: list[str] = Field(default_factory=list, description="overrides of every point of this axis")
    paper: dict[str, float] = Field(default_factory=dict, description="the paper's score of some points: label -> score")

    @model_validator(mode="after")
    def _check(self) -> "AxisSpec":
        if bool(self.key) == bool(self.points) or (self.key and not self.values):
            raise ValueError("an axis needs either `key` with `values`, or `points` (label -> overrides)")
        unknown = set(self.paper) - set(self.overrides())
        if unknown:
            raise ValueError(f"`paper` names no point of the axis: {', '.join(sorted(unknown))} (points: {', '.join(self.overrides())})")
        return self

    def overrides(self) -> dict[str, list[str]]:
        if self.points:
            return {label: [*self.set, *sets] for label, sets in self.points.items()}
        return {str(v): [*self.set, f"{self.key}={json.dumps(v) if not isinstance(v, str) else v}"] for v in self.values}


class GridSpec(StrictModel):
    name: str = "sweep"
    config: str = "feedback_edit"
    set: list[str] = Field(default_factory=list)
    questions: str | None = None
    baseline_answers: str | None = None
    judge: str | dict | None = None
    reference: list[str] = Field(default_factory=lambda: ["mode=greedy", "generate.num_responses=1"])
    reference_paper: float | None = Field(None, description="the paper's score of the reference point")
    limit: PositiveInt | None = Field(None, description="only the first N questions")
    axes: dict[str, AxisSpec]

    def points(self) -> list[tuple[str, str, list[str]]]:
        """(axis, label, overrides) of every point, the greedy reference first."""
        return [(REFERENCE_AXIS, "greedy", self.reference)] + [
            (axis, label, sets) for axis, spec in self.axes.items() for label, sets in spec.overrides().items()
        ]

    def paper(self, axis: str, label: str) -> float | None:
        """The paper's score of a point, when the grid gives it."""
        return self.reference_paper if axis == REFERENCE_AXIS else self.axes[axis].paper.get(label)


def load_grid(path: str | Path, overrides: Iterable[str] = ()) -> GridSpec:
    """A grid file or a preset in configs/sweeps/ (by name), with `key=value` overrides of grid keys (`--set`)."""
    path = resolve(path, CONFIGS_DIR / "sweeps", what="grid")
    grid = load(GridSpec, path, overrides, what="grid")
    return grid.model_copy(update={k: _relative(path, getattr(grid, k)) for k in ("questions", "baseline_answers")})


def _relative(grid_path: Path, value: str | None) -> str | None:
    """Paths in a grid file are relative to the working directory, else to the grid file."""
    if value is None or Path(value).exists() or Path(value).is_absolute():
        return value
    beside = grid_path.parent / value
    return str(beside) if beside.exists() else value


@dataclass(frozen=True)
class PointResult:
    axis: str
    label: str
    model_id: str
    config_hash: str
    questions: int
    verdicts: int  # games with a verdict (2 per question at most)
    score: float | None  # None: the judge gave no verdict at all
    ci_low: float | None
    ci_high: float | None
    generated_tokens: float  # mean over answers, every stage
    tokens: float  # prompt + completion, every stage
    tokens_vs_reference: float | None
    latency_s: float  # median per answer
    answer_tokens: float  # mean token_len of the final answers
    paper: float | None = None  # the paper's score of this setting (the grid's `paper`)
    no_edit_rate: float | None = None  # edits identical to their response (whitespace aside); None: no edits counted


def point_id(axis: str, label: str, config_hash: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{axis}={label}")[:60] + f"-{config_hash[:8]}"


def run_sweep(
    grid: GridSpec,
    out: Path,
    *,
    questions: str | None = None,
    baseline_answers: str | None = None,
    judge: str | dict | None = None,
    limit: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> list[PointResult]:
    """Answer, judge and score every point (reusing what `out` already holds); write table and plots."""
    from engine.placement import plan_pools
    from engine.pools import Pools
    from benchmarks.arena_hard.answer import answer_questions
    from benchmarks.arena_hard.formats import read_answers, read_judgments, read_questions
    from benchmarks.arena_hard.judge import judge_answers, load_judge_config
    from benchmarks.arena_hard.score import score_judgments
    from engine.config import load_config
    from engine.runner import init_ray

    questions = questions or grid.questions
    baseline_answers = baseline_answers or grid.baseline_answers
    if not questions or not baseline_answers:
        raise ConfigError("a sweep needs `questions` and `baseline_answers` (in the grid file or as --questions / --baseline-answers)")
    judge_cfg = load_judge_config(judge if judge is not None else grid.judge)
    qs = read_questions(questions)[: limit or grid.limit]
    answer_dir, judgment_dir = out / "data" / "model_answer", out / "data" / "model_judgment" / judge_cfg.judge_name
    configs = [(axis, label, load_config(grid.config, [*grid.set, *sets])) for axis, label, sets in grid.points()]
    pools, covered = None, set()
    results: list[PointResult] = []
    try:
        for axis, label, cfg in configs:
            mid = point_id(axis, label, cfg.config_hash())
            log.info("sweep point %s=%s (%s)", axis, label, mid)
            answers_path = answer_dir / f"{mid}.jsonl"
            run = None
            if len(read_answers(answers_path) if answers_path.is_file() else {}) < len(qs):
                needed = {p.key for p in plan_pools(cfg).values()}
                if pools is None or not needed <= covered:
                    if pools is not None:
                        pools.shutdown()
                    init_ray(cfg, address)
                    pools = Pools(cfg)
                    pools.start()
                    covered = needed
                run = answer_questions(cfg, qs, mid, answer_dir, pools=pools, progress=progress).summary
            counts = tally(out / "data" / "counts" / f"{mid}.json", cfg, run)
            judge_answers(judge_cfg, qs, answers_path, Path(baseline_answers), judgment_dir, progress=progress)
            judgments = [j for j in read_judgments(judgment_dir) if j.model == mid]
            verdicts = sum(g is not None and g.score is not None for j in judgments for g in j.games)
            score = None
            if verdicts:
                scored = score_judgments(judgments, judge_cfg.baseline, None if qs[0].version == "v0.1" else qs[0].category)
                score = next(s for s in scored if s.model == mid)
            answers = [a for a in read_answers(answers_path).values() if a.cost is not None]
            results.append(
                PointResult(
                    axis=axis, label=label, model_id=mid, config_hash=cfg.config_hash(), questions=len(answers), verdicts=verdicts,
                    score=score.score if score else None, ci_low=score.ci_low if score else None, ci_high=score.ci_high if score else None,
                    generated_tokens=statistics.mean(a.cost.generated_tokens for a in answers),
                    tokens=statistics.mean(a.cost.tokens for a in answers),
                    tokens_vs_reference=None,
                    latency_s=statistics.median(a.cost.latency_s for a in answers),
                    answer_tokens=statistics.mean(a.token_len for a in answers),
                    paper=grid.paper(axis, label), no_edit_rate=counts.no_edit_rate,
                )
            )
    finally:
        if pools is not None:
            pools.shutdown()
    reference = results[0].generated_tokens or 1.0
    results = [PointResult(**{**asdict(r), "tokens_vs_reference": round(r.generated_tokens / reference, 2)}) for r in results]
    write_report(results, out, grid.name)
    return results


def tally(path: Path, cfg: FescaleConfig, run: Summary | None) -> Summary:
    """A point's counts over all its answer runs: those saved in `path` plus `run`'s (then saved)."""
    counts = json.loads(path.read_text()) if path.is_file() else {}
    if run is not None:
        counts = {k: counts.get(k, 0) + getattr(run, k) for k in COUNTED}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts) + "\n")
    return Summary(cfg.mode, cfg.config_hash(), **{k: counts.get(k, 0) for k in COUNTED})


def pareto_frontier(results: list[PointResult]) -> list[PointResult]:
    """Scored points no cheaper point beats: sorted by generated tokens, each scores above all before it."""
    frontier, best = [], float("-inf")
    for r in sorted((r for r in results if r.score is not None), key=lambda r: (r.generated_tokens, -r.score)):
        if r.score > best:
            frontier.append(r)
            best = r.score
    return frontier


def pick_for_budget(results: list[PointResult], tokens: float) -> PointResult | None:
    """The best-scoring point spending at most `tokens` generated tokens per answer."""
    affordable = [r for r in results if r.score is not None and r.generated_tokens <= tokens]
    return max(affordable, key=lambda r: (r.score, -r.generated_tokens), default=None)


def cheapest_reaching(results: list[PointResult], score: float) -> PointResult | None:
    """The point spending the fewest tokens whose score reaches `score`."""
    reaching = [r for r in results if r.score is not None and r.score >= score]
    return min(reaching, key=lambda r: (r.generated_tokens, -r.score), default=None)


def markdown_table(results: list[PointResult]) -> str:
    def num(x: float | None, fmt: str = ".1f") -> str:
        return "n/a" if x is None else format(x, fmt)

    frontier = {r.model_id for r in pareto_frontier(results)}
    rows = [
        (
            r.axis, r.label, num(r.score), num(r.paper), f"({num(r.ci_low)}, {num(r.ci_high)})", f"{r.verdicts}/{2 * r.questions}",
            f"{r.generated_tokens:.0f}", f"{num(r.tokens_vs_reference, '.2f')}x", f"{r.latency_s:.1f}",
            percent(r.no_edit_rate), "*" if r.model_id in frontier else "",
        )
        for r in results
    ]  # fmt: skip
    header = ["axis", "value", "score", "paper", "95% CI", "verdicts", "gen. tokens/answer", "vs greedy", "p50 latency s", "no-edit", "Pareto"]
    return format_table(header, rows)


def write_report(results: list[PointResult], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"name": name, "points": [asdict(r) for r in results]}, indent=2) + "\n")
    (out / "sweep.md").write_text(f"# {name}\n\n{markdown_table(results)}\n")
    plot(results, out, name)


def load_results(out: Path) -> list[PointResult]:
    path = out / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run the sweep first")
    return [PointResult(**p) for p in json.loads(path.read_text())["points"]]


def plot(results: list[PointResult], out: Path, name: str) -> None:
    """`scaling.png`: score vs generated tokens (relative to greedy, log2) per axis with 95% CI bars and
    the paper's scores as crosses in the axis' colour; `pareto.png`: every point and the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, points: list[PointResult], **kwargs):
        xs = [r.tokens_vs_reference or 1.0 for r in points]
        ys = [r.score for r in points]
        err = [[r.score - r.ci_low for r in points], [r.ci_high - r.score for r in points]]
        return ax.errorbar(xs, ys, yerr=err, capsize=3, marker="o", **kwargs)

    scored = [r for r in results if r.score is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for axis in dict.fromkeys(r.axis for r in scored):
        points = sorted((r for r in scored if r.axis == axis), key=lambda r: r.generated_tokens)
        line = draw(ax, points, label=axis)
        paper = [r for r in points if r.paper is not None]
        ax.plot([r.tokens_vs_reference or 1.0 for r in paper], [r.paper for r in paper], "x", color=line[0].get_color(), markersize=8)
        for r in points:
            ax.annotate(r.label, (r.tokens_vs_reference or 1.0, r.score), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="generated tokens per answer, relative to greedy (log2)", ylabel="Arena Hard score (%)", title=f"{name}: score vs compute")
    ax.grid(alpha=0.3)
    if scored:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if scored:
        draw(ax, scored, linestyle="none", color="tab:gray", label="sweep points")
        frontier = pareto_frontier(scored)
        ax.plot([r.tokens_vs_reference or 1.0 for r in frontier], [r.score for r in frontier], "-o", color="tab:red", markersize=8, zorder=3, label="Pareto frontier")
        for r in frontier:
            ax.annotate(f"{r.axis}={r.label}", (r.tokens_vs_reference or 1.0, r.score), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="generated tokens per answer, relative to greedy (log2)", ylabel="Arena Hard score (%)", title=f"{name}: Pareto frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
