"""The row that flows through the pipeline: one per prompt, all candidates nested inside.

`PromptState` is both the in-flight state Ray Data carries through the pipeline and, once `final` is set, the
public output row (documented in README "Output format"). Keeping every candidate of a prompt in
one row means no stage ever needs a shuffle or a join.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Row):
    role: Literal["system", "user", "assistant"]
    content: str


class Feedback(_Row):
    text: str
    level: Literal["not", "slightly", "partially", "mostly", "perfectly"] | None  # None: unparseable
    keywords: int  # count of constructive-criticism keywords
    kept: bool = False  # among the top E effective feedback


class Edit(_Row):
    text: str
    finish_reason: Literal["stop", "length"] = "stop"  # "length": cut at max_tokens
    feedback_set: int | None  # index into the candidate's feedback_sets; None for edits without feedback
    score: float | None = None


class Candidate(_Row):
    """One initial response, its feedback, the feedback sets formed from it and their edits."""

    text: str
    finish_reason: Literal["stop", "length"] = "stop"  # "length": cut at max_tokens
    score: float | None = None  # reward score of the unedited response, when it was a select candidate
    feedback: list[Feedback] = Field(default_factory=list)
    feedback_sets: list[list[int]] = Field(default_factory=list)  # indices into `feedback`
    edits: list[Edit] = Field(default_factory=list)


class Selected(_Row):
    response: int  # index into candidates
    feedback_set: int | None  # index into that candidate's feedback_sets (None: not an edit or no feedback)
    edit: int | None  # index into that candidate's edits (None: the unedited response won)
    score: float | None  # None when there was a single candidate and nothing had to be scored


class Usage(_Row):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int = 0) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


class RowError(_Row):
    stage: str
    message: str


class PromptState(_Row):
    id: str
    messages: list[Message]
    mode: str
    config_hash: str
    final: str | None = None
    selected: Selected | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    usage: dict[str, Usage] = Field(default_factory=dict)
    error: RowError | None = None

    def final_finish_reason(self) -> str:
        """Why the selected answer ended: "stop", or "length" when it was cut at max_tokens."""
        if self.selected is None:
            return "stop"
        cand = self.candidates[self.selected.response]
        return (cand if self.selected.edit is None else cand.edits[self.selected.edit]).finish_reason

    def ranked(self, n: int) -> list[tuple[str, str]]:
        """The n best (text, finish reason) by the selector's scores, the selected answer first (ties
        keep the candidates' order, as selection does); fewer if fewer were scored."""
        if self.selected is None or self.selected.score is None:
            return [(self.final or "", self.final_finish_reason())]
        scored = [
            (target.score, k, target.text, target.finish_reason)
            for k, target in enumerate(t for c in self.candidates for t in (*c.edits, c))
            if target.score is not None
        ]
        return [(text, reason) for _, _, text, reason in sorted(scored, key=lambda s: (-s[0], s[1]))[:n]]

    def usage_of(self, stage: str) -> Usage:
        return self.usage.setdefault(stage, Usage())

    def conversation(self) -> list[dict]:
        return [m.model_dump() for m in self.messages]

    def output_row(self) -> dict:
        """The public output row (see README "Output format")."""
        return self.model_dump(mode="json", exclude={"error"})

    def sft_row(self) -> dict:
        """The distillation-SFT row: the prompt's messages with the final answer as the assistant turn."""
        return {"id": self.id, "messages": self.conversation() + [{"role": "assistant", "content": self.final}]}

    def error_row(self) -> dict:
        return {"id": self.id, "stage": self.error.stage, "error": self.error.message}
