"""The row that flows through the pipeline: one per prompt, all candidates nested inside.

`PromptState` is both the in-flight state Ray Data carries through the pipeline and, once `final` is set, the
public output row (documented in README "Output format"). Keeping every candidate of a prompt in
one row means no stage ever needs a shuffle or a join.

The rows are msgspec Structs: a row is built and written as JSON once per prompt by the stage actor
and read back by the driver, and at the paper's scale (184 completions, a ~68 KB row per prompt)
pydantic's validating models cost more CPU than the method itself (benchmarks.engine_overhead).
Their values come from inputs and model outputs checked where they enter (`engine.inputs`, the
Serve app's request models); reading a row back (`PromptState.from_json`) checks every type.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class _Row(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Unknown fields in JSON are an error: a row of another version must not be read as this one.

    `gc=False`: a row is a tree of values and never refers back to itself, so the cyclic garbage
    collector has nothing to find in it; tracked, every collection walked every live row, which made
    reading rows back five times slower in a driver holding many of them."""

    def to_dict(self) -> dict:
        """Plain dicts, lists and values, as JSON would hold them."""
        return msgspec.to_builtins(self)


class Message(_Row):
    role: Literal["system", "user", "assistant"]
    content: str


class Feedback(_Row):
    text: str
    level: Literal["not", "slightly", "partially", "mostly", "perfectly"] | None  # None: unparseable
    keywords: int  # count of constructive-criticism keywords
    kept: bool = False  # among the top E effective feedback


class Edit(_Row, kw_only=True):  # (keyword-only: a required field after defaults)
    text: str
    finish_reason: Literal["stop", "length"] = "stop"  # "length": cut at max_tokens
    feedback_set: int | None  # index into the candidate's feedback_sets; None for edits without feedback
    score: float | None = None


class Candidate(_Row):
    """One initial response, its feedback, the feedback sets formed from it and their edits."""

    text: str
    finish_reason: Literal["stop", "length"] = "stop"  # "length": cut at max_tokens
    score: float | None = None  # reward score of the unedited response, when it was a select candidate
    feedback: list[Feedback] = msgspec.field(default_factory=list)
    feedback_sets: list[list[int]] = msgspec.field(default_factory=list)  # indices into `feedback`
    edits: list[Edit] = msgspec.field(default_factory=list)


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
    candidates: list[Candidate] = msgspec.field(default_factory=list)
    usage: dict[str, Usage] = msgspec.field(default_factory=dict)
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
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def to_json(self) -> str:
        """The row as JSON, every field; text UTF-8 cannot hold (a lone surrogate) raises `UnicodeEncodeError`."""
        return _encoder.encode(self).decode()

    @staticmethod
    def from_json(data: str | bytes) -> PromptState:
        """A row written by `to_json`; a malformed one raises `msgspec.ValidationError`/`DecodeError`."""
        # str(): a numpy str_ (a column of a numpy batch) would be read through its UCS-4 buffer; a
        # plain str is returned as is.
        return _decoder.decode(str(data) if isinstance(data, str) else data)

    def output_row(self) -> dict:
        """The public output row (see README "Output format")."""
        row = self.to_dict()
        del row["error"]
        return row

    def sft_row(self) -> dict:
        """The distillation-SFT row: the prompt's messages with the final answer as the assistant turn."""
        return {"id": self.id, "messages": self.conversation() + [{"role": "assistant", "content": self.final}]}

    def error_row(self) -> dict:
        return {"id": self.id, "stage": self.error.stage, "error": self.error.message}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PromptState)
