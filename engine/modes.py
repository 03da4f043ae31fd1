"""The system's modes: which method stages run and which role serves each of them.

A mode never changes a knob (number of responses, feedback plan, ...): it only switches stages on or
off and routes the feedback and edit stages to a role. That keeps `mode` a per-request switch for the
Serve app, with the same pools loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModeSpec:
    """What runs in a mode: stage switches and the role behind feedback and edits."""

    description: str
    feedback: bool = False
    edit: Literal["none", "with_feedback", "without_feedback"] = "none"
    select: bool = True
    feedback_role: str = "feedback"
    editor_role: str = "editor"
    single_response: bool = False


MODES: dict[str, ModeSpec] = {
    "feedback_edit": ModeSpec(
        "generate N, feedback M per response, filter/rerank, edit K per feedback set, select",
        feedback=True,
        edit="with_feedback",
    ),
    "greedy": ModeSpec("one response per prompt, no feedback, no edit", select=False, single_response=True),
    "best_of_n": ModeSpec("generate N responses and let the reward scorer pick one"),
    "self_feedback_self_edit": ModeSpec(
        "the generator's model writes the feedback and the edits (paper Table 4 ablation)",
        feedback=True,
        edit="with_feedback",
        feedback_role="generator",
        editor_role="generator",
    ),
    "feedback_self_edit": ModeSpec(
        "the feedback model critiques, the generator's model edits (paper Table 4 ablation)",
        feedback=True,
        edit="with_feedback",
        editor_role="generator",
    ),
    "edit_without_feedback": ModeSpec(
        "the editor rewrites each response with the no-feedback template (paper Table 4 ablation)",
        edit="without_feedback",
    ),
}

ModeName = Literal[
    "feedback_edit",
    "greedy",
    "best_of_n",
    "self_feedback_self_edit",
    "feedback_self_edit",
    "edit_without_feedback",
]
