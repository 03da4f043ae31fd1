"""The Feedback-Edit method's pure parts (HelpSteer3 paper, Sections 3.1 and 6).

No Ray and no model calls here: parsing a feedback's helpfulness level, counting constructive
keywords, ranking and filtering feedback, forming feedback sets, and building the conversations
each role sees. `engine.steps` calls these around the model calls; tests check them directly.
"""

from __future__ import annotations

import math
import random
import re
from typing import Literal, Sequence

LEVELS = ("not", "slightly", "partially", "mostly", "perfectly")
LEVEL_PREFIX = "The response is"

# "Start the evaluation with the statement - The response is {level} helpful." Leading markdown or
# quotes are tolerated; anything else before the statement makes the feedback unparseable.
_LEVEL_RE = re.compile(
    r"""^[\s*#>"'`_-]*the\s+response\s+is\s+(not|slightly|partially|mostly|perfectly)\s+helpful""",
    re.IGNORECASE,
)
# The paper's constructive-criticism keywords: However, improve, lack, benefit, but. Counted
# case-insensitively, with their word forms (improvement, lacks, beneficial, ...): a word that starts
# with improv/lack/benefi, or is exactly however/but. Each entry: (stem, must it end the word?).
_KEYWORD_STEMS = (("however", True), ("improv", False), ("lack", False), ("benefi", False), ("but", True))


def parse_level(text: str) -> str | None:
    """The helpfulness level a feedback starts with, or None when it does not follow the template."""
    m = _LEVEL_RE.match(text)
    return m.group(1).lower() if m else None


def count_keywords(text: str) -> int:
    r"""How many constructive keywords (`_KEYWORD_STEMS`) the feedback has, in any letter case.

    The same count as `len(regex.findall(r"\b(?:however\b|improv|lack|benefi|but\b)", text,
    regex.IGNORECASE))` on ordinary text (tests/test_method.py checks it on random strings): a keyword
    starts at a word boundary, and however/but must also end at one. A word character is one with
    `c.isalnum() or c == "_"` (the same as `\w` on ASCII). Exotic Unicode next to a keyword is out of
    scope and may count differently from that regex: combining marks, superscript digits, connector
    punctuation other than "_", letters that lowercase to two characters (İ).

    Why not the regex: this runs for each of the 128 feedback per prompt in the engine's hot loop, and
    lowering once then `str.find` per stem takes about half the regex's time (it tries the alternation
    at every position). Counting each stem on its own equals the regex's count because matches of
    different stems cannot overlap: a match is all word characters and needs a boundary before it.
    """
    low = " " + text.lower() + " "  # the padding spaces are non-word neighbours at both ends
    count = 0
    for stem, whole_word in _KEYWORD_STEMS:
        i = low.find(stem)
        while i >= 0:
            end = i + len(stem)
            before, after = low[i - 1], low[end]  # i >= 1 and end < len(low) thanks to the padding
            if not (before.isalnum() or before == "_") and not (whole_word and (after.isalnum() or after == "_")):
                count += 1
            i = low.find(stem, end)  # no stem can overlap itself, so resume after this one
    return count


def no_edits(original: str, edits: Sequence[str]) -> int:
    """How many of a response's edits changed nothing of substance: the same words as the response
    once every run of whitespace is one space (re-indenting or re-wrapping is no edit; any changed
    character is one). The response is split once for all its edits (the summary counts every row).

    The paper trains the Edit model with RLOO partly because Edit SFT often returns the response as
    it was; this is the simple, checkable reading of that "no edit" that the summaries count.
    """
    words = original.split()
    return sum(edit == original or edit.split() == words for edit in edits)


def rank_feedback(levels: Sequence[str | None], keywords: Sequence[int], effective: int | None) -> list[int]:
    """Indices of the effective feedback, best first.

    Drops "perfectly helpful" and unparseable feedback, ranks the rest by keyword count (ties keep
    sampling order), and keeps the top `effective` (all when None).
    """
    usable = [i for i, level in enumerate(levels) if level is not None and level != "perfectly"]
    usable.sort(key=lambda i: -keywords[i])  # stable: equal counts keep their order
    return usable if effective is None else usable[:effective]


def form_sets(ranked: Sequence[int], how: Literal["random", "top", "partition"], size: int, rng: random.Random) -> list[list[int]]:
    """Feedback sets (lists of feedback indices) to edit from; empty when no feedback is left.

    random: one set of up to `size` drawn at random from the ranked feedback (the paper's baseline);
    top: one set of the `size` best; partition: all ranked feedback, in rank order, in sets of `size`.
    """
    ranked = list(ranked)
    if not ranked:
        return []
    if how == "top":
        return [ranked[:size]]
    if how == "random":
        picked = set(rng.sample(ranked, min(size, len(ranked))))
        return [[i for i in ranked if i in picked]]  # keep rank order inside the set
    return [ranked[i : i + size] for i in range(0, len(ranked), size)]


def row_rng(seed: int, *keys: object) -> random.Random:
    """A random generator fixed by the run seed and the row's keys (same in every process)."""
    return random.Random(":".join(str(k) for k in (seed, *keys)))


# -- conversations each role sees ----------------------------------------------------------------


def with_response(messages: list[dict], response: str, instruction: str) -> list[dict]:
    """The conversation, the response as an assistant turn, and an instruction as the next user turn."""
    return [*messages, {"role": "assistant", "content": response}, {"role": "user", "content": instruction}]


def edit_instruction(feedbacks: Sequence[str], header: str, joiner: str, filler: str, slots: int = 3) -> str:
    """The edit template: the header, then `slots` feedbacks, `filler` for the missing ones."""
    padded = list(feedbacks) + [filler] * (slots - len(feedbacks))
    return joiner.join([header, *padded])


def select_instruction(messages: list[dict], candidates: Sequence[str], template: str) -> list[dict]:
    """One user turn showing the conversation and numbered candidates (generative select)."""
    conversation = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
    listing = "\n\n".join(f"[{i + 1}]\n{text}" for i, text in enumerate(candidates))
    return [{"role": "user", "content": template.format(n=len(candidates), conversation=conversation, candidates=listing)}]


_CHOICE_RE = re.compile(r"\d+")


def parse_choice(text: str, n: int) -> int | None:
    """The 0-based candidate a generative select names: the first number in 1..n it writes."""
    for m in _CHOICE_RE.finditer(text):
        k = int(m.group())
        if 1 <= k <= n:
            return k - 1
    return None


def sample_levels(logprobs: Sequence[float], temperature: float, count: int, rng: random.Random) -> list[str]:
    """Draw `count` helpfulness levels from the model's next-token distribution over the level words.

    Used by `feedback.guided_level`: the model's own preference among the five levels, tempered like
    its sampling; greedy (temperature 0) takes the most likely level every time.
    """
    if temperature == 0:
        best = max(range(len(LEVELS)), key=lambda i: logprobs[i])
        return [LEVELS[best]] * count
    scaled = [lp / temperature for lp in logprobs]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    return rng.choices(LEVELS, weights=weights, k=count)
