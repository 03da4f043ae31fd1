"""The run summary's counts from finished rows, without a model: what the run, distill (`row_stats`
sent back by the writers) and sweep summaries report about feedback that has no level and no-edits."""

from __future__ import annotations

from engine.rows import Candidate, Edit, Feedback, Message, PromptState
from engine.summary import Summary, row_stats


def fb(text: str, level: str | None, kept: bool = False) -> Feedback:
    return Feedback(text=text, level=level, keywords=0, kept=kept)


def finished_row() -> PromptState:
    """Two responses: one with an unparseable, a perfect and a kept feedback and two edits (one of them
    the response again, re-wrapped), one whose only feedback was unparseable (kept unedited)."""
    first = Candidate(
        text="Paris is the capital of France.",
        feedback=[fb("It is fine I guess.", None), fb("The response is perfectly helpful.", "perfectly"), fb("The response is mostly helpful. However, ...", "mostly", kept=True)],
        feedback_sets=[[2]],
        edits=[Edit(text="Paris is the capital\nof France.", feedback_set=0), Edit(text="Paris is France's capital.", feedback_set=0)],
    )
    second = Candidate(text="Lyon.", feedback=[fb("Wrong city.", None)])
    return PromptState(id="p", messages=[Message(role="user", content="Capital of France?")], mode="feedback_edit", config_hash="h", candidates=[first, second], final="Paris is France's capital.")


def test_row_stats_count_unparseable_feedback_and_no_edits():
    stats = row_stats(finished_row())
    assert (stats["feedback"], stats["feedback_unparseable"], stats["feedback_perfect"], stats["feedback_kept"]) == (4, 2, 1, 1)
    assert (stats["edits"], stats["edits_unchanged"], stats["responses_unedited"]) == (2, 1, 1)


def test_summary_reports_them_in_its_table_and_dict():
    summary = Summary("feedback_edit", "h")
    summary.add([finished_row(), finished_row()])
    assert summary.feedback_unparseable == 4 and summary.edits_unchanged == 2 and summary.no_edit_rate == 0.5
    table = summary.table()
    assert "4 unparseable dropped" in table and "2 of them no-edits (50.0%)" in table
    data = summary.to_dict()
    assert data["feedback_unparseable"] == 4 and data["edits_unchanged"] == 2 and data["no_edit_rate"] == 0.5


def test_no_edit_rate_is_none_without_edits():
    summary = Summary("greedy", "h")
    summary.add([PromptState(id="g", messages=[Message(role="user", content="hi")], mode="greedy", config_hash="h", candidates=[Candidate(text="hello")], final="hello")])
    assert summary.no_edit_rate is None and "no-edits (n/a)" in summary.table() and summary.to_dict()["no_edit_rate"] is None


def test_the_serve_trace_carries_the_same_counts_for_its_one_prompt():
    from engine.openai_protocol import trace_body

    counts = trace_body(finished_row())["counts"]
    assert (counts["feedback_unparseable"], counts["feedback_perfect"], counts["edits_unchanged"]) == (2, 1, 1)


def test_n_choices_are_the_best_scored_candidates_best_first():
    """OpenAI's `n`: the n best candidates by the selector's scores; the first is the selected answer."""
    from engine.openai_protocol import Completion
    from engine.rows import Selected

    row = finished_row()
    first = row.candidates[0]
    first.edits[0].score, first.edits[1].score = 0.5, 0.9
    row.selected = Selected(response=0, feedback_set=0, edit=1, score=0.9)
    body = Completion("fescale", trace=False, n=2).body(row)
    assert [c["message"]["content"] for c in body["choices"]] == [first.edits[1].text, first.edits[0].text]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert len(Completion("fescale", trace=False, n=5).body(row)["choices"]) == 2  # no more were scored
    events = Completion("fescale", trace=False, n=2).closing(row, include_usage=False)
    assert sum('"finish_reason": "stop"' in e for e in events) == 2 and events[-1] == "data: [DONE]\n\n"
