"""The run summary (counts, tokens per stage, time, throughput) and the tables a person reads."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from engine.method import no_edits
from engine.rows import PromptState


@dataclass
class Summary:
    mode: str
    config_hash: str
    prompts: int = 0  # answered
    failed: int = 0  # a stage raised a per-prompt error (see the errors file)
    input_errors: int = 0  # malformed input rows (see the errors file)
    resumed: int = 0  # already written by an earlier run of the same job, skipped
    responses: int = 0
    feedback: int = 0
    feedback_perfect: int = 0  # dropped: "perfectly helpful"
    feedback_unparseable: int = 0  # dropped: no helpfulness level
    feedback_kept: int = 0  # effective feedback (top E)
    feedback_sets: int = 0
    edits: int = 0
    edits_unchanged: int = 0  # no-edits: the initial response again, whitespace aside (method.no_edits)
    responses_unedited: int = 0  # no feedback left: kept as is, no edit spent on them
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    replica_restarts: int = 0  # model replicas Ray restarted after they died
    retries: int = 0  # model calls retried because their replica died or hung
    load_s: float = 0.0  # starting the pools (placement, model loading)
    wall_s: float = 0.0  # streaming the prompts through the pipeline
    _start: float = field(default_factory=time.monotonic, repr=False)

    def add(self, states: list[PromptState]) -> None:
        for s in states:
            self.add_stats(row_stats(s))

    def add_stats(self, stats: dict) -> None:
        """One prompt's counts (`row_stats`), as the distill job's writers send them back."""
        if stats["failed"]:
            self.failed += 1
            return
        self.prompts += 1
        for stage, usage in stats["tokens"].items():
            t = self.tokens.setdefault(stage, {"prompt_tokens": 0, "completion_tokens": 0})
            t["prompt_tokens"] += usage["prompt_tokens"]
            t["completion_tokens"] += usage["completion_tokens"]
        for key in COUNTED:
            setattr(self, key, getattr(self, key) + stats[key])

    def faults(self, counts: dict[str, int]) -> None:
        self.replica_restarts, self.retries = counts["restarts"], counts["retries"]

    def loaded(self) -> None:
        self.load_s = time.monotonic() - self._start
        self._start = time.monotonic()

    def finish(self) -> None:
        self.wall_s = time.monotonic() - self._start

    @property
    def no_edit_rate(self) -> float | None:
        """The share of edits that are no-edits; None when nothing was edited."""
        return round(self.edits_unchanged / self.edits, 4) if self.edits else None

    @property
    def completion_tokens(self) -> int:
        return sum(t["completion_tokens"] for t in self.tokens.values())

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["completion_tokens"] = self.completion_tokens
        data["no_edit_rate"] = self.no_edit_rate
        data["tokens_per_s"] = round(self.completion_tokens / self.wall_s, 2) if self.wall_s else None
        data["load_s"], data["wall_s"] = round(self.load_s, 2), round(self.wall_s, 2)
        return data

    def table(self) -> str:
        d = self.to_dict()
        rows = [
            ("mode", f"{self.mode} (config {self.config_hash})"),
            ("prompts", f"{self.prompts} answered, {self.failed} failed, {self.input_errors} malformed input rows, {self.resumed} resumed"),
            ("responses", str(self.responses)),
            ("feedback", f"{self.feedback} sampled, {self.feedback_perfect} perfectly helpful and {self.feedback_unparseable} unparseable dropped, {self.feedback_kept} kept"),
            ("edits", f"{self.edits} from {self.feedback_sets} feedback sets, {self.edits_unchanged} of them no-edits ({percent(self.no_edit_rate)}); {self.responses_unedited} responses kept unedited"),
        ]
        for stage, t in self.tokens.items():
            rows.append((f"tokens: {stage}", f"{t['prompt_tokens']} prompt, {t['completion_tokens']} completion"))
        rows.append(("faults", f"{self.replica_restarts} replica restarts, {self.retries} retried calls"))
        rows.append(("time", f"{d['load_s']}s loading models, {d['wall_s']}s pipeline, {d['tokens_per_s']} generated tok/s"))
        return format_table(["run summary", ""], rows)


COUNTED = ("responses", "feedback", "feedback_perfect", "feedback_unparseable", "feedback_kept", "feedback_sets", "edits", "edits_unchanged", "responses_unedited")


def row_stats(s: PromptState) -> dict:
    """What the summary counts of one finished prompt: small enough to send back instead of the row."""
    if s.error is not None:
        return {"failed": True, "stage": s.error.stage, "error": s.error.message.splitlines()[0] if s.error.message else ""}
    feedback = [f for c in s.candidates for f in c.feedback]
    return {
        "failed": False,
        "tokens": {stage: u.to_dict() for stage, u in s.usage.items()},
        "responses": len(s.candidates),
        "feedback": len(feedback),
        "feedback_perfect": sum(f.level == "perfectly" for f in feedback),
        "feedback_unparseable": sum(f.level is None for f in feedback),
        "feedback_kept": sum(f.kept for f in feedback),
        "feedback_sets": sum(len(c.feedback_sets) for c in s.candidates),
        "edits": sum(len(c.edits) for c in s.candidates),
        "edits_unchanged": sum(no_edits(c.text, [e.text for e in c.edits]) for c in s.candidates),
        "responses_unedited": sum(bool(c.feedback) and not c.feedback_sets for c in s.candidates),
    }


def results_table(states: list[PromptState], width: int = 60) -> str:
    """prompt -> final answer, one line each (long texts shortened)."""
    rows = [(s.id, _short(s.messages[-1].content, width // 2), _short(s.final or f"ERROR: {s.error.message if s.error else ''}", width)) for s in states]
    return format_table(["id", "prompt", "final answer"], rows)


def format_table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    """A markdown table (readable in a terminal and pasteable into a README)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def percent(rate: float | None) -> str:
    """A rate as the tables show it (None: nothing to rate)."""
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
