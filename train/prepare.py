"""The paper's data preparation (HelpSteer3, arXiv 2503.04378, Section 3.2 and Appendix G).

Pure functions from checked HelpSteer3 rows (`train.data`) to training examples, each counting
what it drops and why in a `Drops` so a user sees the data before paying for training:
- Feedback Demonstration: one example per (context, response) with its feedbacks as targets;
  a response whose feedbacks disagree by more than `max_level_spread` helpfulness levels is dropped.
- Edit Demonstration: "perfectly helpful" feedback removed, optionally feedback whose change summary
  does not address it (the LLM check, `applied_feedback`), then one example per permutation of the
  remaining feedback (the editor must not depend on feedback order).
- Edit Preference: (edit conversation, good edit, bad edit, original) from General and STEM. The
  Edit RM ranks edits of one (prompt, initial response, feedback) tuple, so it reads the edit
  conversation the editor sees (`edit_prompt`) and then the edit; RLOO samples its rollouts from
  the same edit conversations (the paper's 3,008 RLOO prompts are this set).
- Distillation: the final answers `fescale distill` wrote.
Splits are made per source row before any expansion, so permutations of one row never straddle
train and validation.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

from engine import method, templates

Messages = list[dict]


@dataclass(frozen=True)
class SFTExample:
    """Train on `response` after `prompt` (the prompt side is masked out of the loss)."""

    id: str
    prompt: Messages
    response: str


@dataclass(frozen=True)
class PreferenceTuple:
    """One (prompt, original, feedback) tuple and its edits. `context` is the edit conversation
    (prompt, original as the assistant turn, the edit instruction with the feedback): the RM reads it
    and then each response (good edit, bad edit, or the original as "no edit")."""

    id: str
    context: Messages
    original: str
    good: str
    bad: str

    @property
    def key(self) -> str:
        """What makes tuples distinct in an RM step: the edit conversation holds prompt, original and feedback."""
        return json.dumps(self.context)


@dataclass
class Drops:
    """Why examples were dropped, by reason (printed and recorded before training)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def level_index(feedback: str) -> int | None:
    level = method.parse_level(feedback)
    return None if level is None else method.LEVELS.index(level)


def feedback_demonstrations(
    rows: Iterable[dict],
    drops: Drops,
    max_level_spread: int = 2,
    targets: Literal["all", "one"] = "all",
    seed: int = 0,
) -> list[SFTExample]:
    """Feedback SFT examples: the feedback template after each response, a feedback as the target.

    `max_level_spread` 2 keeps "mostly" next to "partially" but drops "perfectly" next to "slightly"
    (3 levels apart), the paper's example of strong disagreement. `targets`: "all" trains on every
    feedback of a response (one sequence each), "one" on one drawn with `seed`.
    """
    out = []
    for row in rows:
        for k in (1, 2):
            key = f"{row['_source']}:{row['_line']}:response{k}"
            feedbacks = list(row[f"feedback{k}"])
            levels = [level_index(f) for f in feedbacks]
            if any(lv is None for lv in levels):
                drops.add("feedback not in the template's form", sum(lv is None for lv in levels))
                feedbacks = [f for f, lv in zip(feedbacks, levels) if lv is not None]
                levels = [lv for lv in levels if lv is not None]
            if not feedbacks:
                drops.add("no usable feedback")
                continue
            if max(levels) - min(levels) > max_level_spread:
                drops.add(f"feedbacks disagree (level spread > {max_level_spread})")
                continue
            if targets == "one":
                feedbacks = [method.row_rng(seed, key).choice(feedbacks)]
            prompt = method.with_response(row["context"], row[f"response{k}"], templates.FEEDBACK)
            out += [SFTExample(f"{key}:{j}", prompt, f) for j, f in enumerate(feedbacks)]
    return out


def edit_prompt(context: Messages, original: str, feedbacks: Sequence[str], joiner: str) -> Messages:
    """The edit conversation: what the editor answers with an edit, and what the Edit RM reads before one."""
    instruction = method.edit_instruction(feedbacks, templates.EDIT, joiner, templates.EDIT_FILLER)
    return method.with_response(context, original, instruction)


def without_perfect(feedbacks: Sequence[str], drops: Drops) -> list[str]:
    """The feedback an editor is given: "perfectly helpful" feedback asks for no edit (the engine drops it too)."""
    kept = [f for f in feedbacks if method.parse_level(f) != "perfectly"]
    drops.add('"perfectly helpful" feedback', len(feedbacks) - len(kept))
    return kept


def edit_demonstrations(
    rows: Iterable[dict],
    drops: Drops,
    applied: Callable[[list[tuple[str, str]]], list[bool]] | None = None,
    joiner: str = "\n",
) -> list[SFTExample]:
    """Edit SFT examples: one per permutation of each row's usable feedback.

    `applied(pairs)` answers, for each (change_summary, feedback) pair, whether the summary addresses
    the feedback (`applied_feedback` runs the paper's LLM check); None skips that step.
    """
    rows = list(rows)
    kept = [without_perfect(row["feedback"], drops) for row in rows]
    if applied is not None:
        pairs = [(row["change_summary"], f) for row, feedbacks in zip(rows, kept) for f in feedbacks]
        answers = iter(applied(pairs))
        filtered = []
        for feedbacks in kept:
            yes = [f for f in feedbacks if next(answers)]
            drops.add("feedback not addressed by the change summary", len(feedbacks) - len(yes))
            filtered.append(yes)
        kept = filtered
    out = []
    for row, feedbacks in zip(rows, kept):
        if not feedbacks:
            drops.add("edit rows with no feedback left")
            continue
        for j, order in enumerate(itertools.permutations(feedbacks)):
            prompt = edit_prompt(row["context"], row["original_response"], order, joiner)
            out.append(SFTExample(f"{row['_source']}:{row['_line']}:perm{j}", prompt, row["edited_response"]))
    return out


def edit_preferences(
    rows: Iterable[dict], drops: Drops, domains: Sequence[str] = ("general", "stem"), joiner: str = "\n"
) -> list[PreferenceTuple]:
    """The Edit Preference set from `edit_quality` rows: the Edit RM's tuples and Edit RLOO's prompts.

    The feedback goes into the edit conversation in its published order, "perfectly helpful" ones
    removed as for the editor; a row left without feedback is dropped.
    """
    out = []
    for row in rows:
        if row["domain"] not in domains:
            drops.add(f"domain not in {list(domains)}")
            continue
        feedbacks = without_perfect(row["feedback"], drops)
        if not feedbacks:
            drops.add("edit rows with no feedback left")
            continue
        prompt = edit_prompt(row["context"], row["original_response"], feedbacks, joiner)
        good, bad = row["good_edited_response"], row["bad_edited_response"]
        out.append(PreferenceTuple(f"{row['_source']}:{row['_line']}", prompt, row["original_response"], good, bad))
    return out


def distill_examples(rows: Iterable[dict]) -> list[SFTExample]:
    return [SFTExample(row["id"] or f"{row['_source']}:{row['_line']}", row["context"], row["response"]) for row in rows]


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded shuffle, `fraction` of the rows (at least one) to validation."""
    if len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def applied_feedback(role, seed: int = 0) -> Callable[[list[tuple[str, str]]], list[bool]]:
    """The paper's feedback application identification, run through the engine's pools on `role`.

    Each (change summary, feedback) pair is asked greedily with the paper's template; an answer that
    starts with "Yes" keeps the feedback.
    """

    def check(pairs: list[tuple[str, str]]) -> list[bool]:
        import asyncio

        from actors.backend import ChatRequest, Sampling
        from engine.pools import role_pools

        if not pairs:
            return []
        sampling = Sampling(n=1, temperature=0.0, max_tokens=4)
        requests = [
            ChatRequest(({"role": "user", "content": templates.FEEDBACK_APPLICATION.format(change_summary=s, feedback=f)},), sampling)
            for s, f in pairs
        ]
        with role_pools(role, seed) as pools:
            results = asyncio.run(pools.client("generator").chat(requests))
        return [r.completions[0].text.strip().lower().startswith("yes") for r in results]

    return check
