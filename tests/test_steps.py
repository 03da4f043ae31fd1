"""Each method step on a real tiny model (HF backend called in-process, no Ray).

A `Recorder` wraps the real backend and keeps the requests each step sends, so the tests can check
the exact conversations (templates, feedback order, <None> filler) the paper prescribes.
"""

import asyncio

import pytest

from actors.backend import BackendSpec
from actors.hf_backend import HFBackend
from conftest import make_config
from engine import method, templates
from engine.rows import Candidate, Edit, Feedback, Message, PromptState
from engine.steps import EditStep, FeedbackStep, FilterStep, Generate, SelectStep, build_steps, edit_conversation, run_steps


class Recorder:
    """Forwards to a real backend and records every request (a spy, not a stand-in)."""

    def __init__(self, backend):
        self.backend = backend
        self.requests = {"chat": [], "next_token_logprobs": [], "classify": []}

    async def chat(self, requests):
        self.requests["chat"] += requests
        return await self.backend.chat(requests)

    async def next_token_logprobs(self, requests):
        self.requests["next_token_logprobs"] += requests
        return await self.backend.next_token_logprobs(requests)

    async def classify(self, requests):
        self.requests["classify"] += requests
        return await self.backend.classify(requests)


@pytest.fixture(scope="module")
def hf(tiny_model):
    return HFBackend(BackendSpec(backend="hf", model=tiny_model, batch_size=16))


def state(prompt="What is 2 + 2?", **kw):
    return PromptState(id="p1", messages=[Message(role="user", content=prompt)], mode="feedback_edit", config_hash="x", **kw)


def run(coro):
    return asyncio.run(coro)


def test_generate_draws_n_responses_in_one_call(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", generate={"num_responses": 3})
    s = state()
    run(Generate(cfg.generate, rec).run(s))
    assert len(s.candidates) == 3 and len(rec.requests["chat"]) == 1
    [req] = rec.requests["chat"]
    assert req.sampling.n == 3 and req.sampling.temperature == 0.7 and req.sampling.top_p == 0.9
    assert s.usage["generate"].completion_tokens > 0 and s.usage["generate"].prompt_tokens == len(hf.fmt.prompt_ids(req.messages))


def test_feedback_follows_the_plan_with_the_paper_template(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", feedback={"plan": "2@0.7+3@0.5", "guided_level": False})
    s = state(candidates=[Candidate(text="4"), Candidate(text="five")])
    run(FeedbackStep(cfg.feedback, rec, seed=0).run(s))
    assert [len(c.feedback) for c in s.candidates] == [5, 5]
    reqs = rec.requests["chat"]
    assert [(r.sampling.n, r.sampling.temperature) for r in reqs] == [(2, 0.7), (3, 0.5), (2, 0.7), (3, 0.5)]
    assert list(reqs[0].messages) == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": templates.FEEDBACK},
    ]
    for f in s.candidates[0].feedback:
        assert f.level == method.parse_level(f.text) and f.keywords == method.count_keywords(f.text)


def test_guided_level_samples_levels_then_prefills_them(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", feedback={"plan": "6@0.7", "guided_level": True})
    s = state(candidates=[Candidate(text="4")])
    run(FeedbackStep(cfg.feedback, rec, seed=0).run(s))
    [scored] = rec.requests["next_token_logprobs"]
    assert scored.prefix == "The response is" and scored.choices == (" not", " slightly", " partially", " mostly", " perfectly")
    fb = s.candidates[0].feedback
    assert len(fb) == 6 and all(f.level in method.LEVELS for f in fb)
    assert all(f.text.startswith(f"The response is {f.level} helpful.") for f in fb)
    assert sum(r.sampling.n for r in rec.requests["chat"]) == 6  # one call per sampled level, n = its count
    again = state(candidates=[Candidate(text="4")])
    run(FeedbackStep(cfg.feedback, hf, seed=0).run(again))
    assert [f.level for f in again.candidates[0].feedback] == [f.level for f in fb]  # seeded


def fb(level, keywords, text=None):
    return Feedback(text=text or f"The response is {level} helpful.", level=level, keywords=keywords)


def test_filter_marks_kept_and_forms_sets():
    cfg = make_config("unused", feedback={"plan": "5@0.7", "effective": 3, "sets": "partition", "set_size": 2})
    s = state(candidates=[Candidate(text="a", feedback=[fb("mostly", 1), fb("perfectly", 5), fb(None, 4), fb("not", 3), fb("slightly", 2)]), Candidate(text="b", feedback=[fb("perfectly", 1)])])
    run(FilterStep(cfg.feedback, seed=0).run(s))
    a, b = s.candidates
    assert [f.kept for f in a.feedback] == [True, False, False, True, True]
    assert a.feedback_sets == [[3, 4], [0]]
    assert b.feedback_sets == [] and not any(f.kept for f in b.feedback)


def test_edit_uses_each_set_k_times_and_skips_responses_without_feedback(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", edit={"edits_per_set": 2})
    a = Candidate(text="draft a", feedback=[fb("not", 1, "F0"), fb("mostly", 2, "F1"), fb("slightly", 0, "F2")], feedback_sets=[[1, 0], [2]])
    b = Candidate(text="draft b", feedback=[fb("perfectly", 0)], feedback_sets=[])
    s = state(candidates=[a, b])
    run(EditStep(cfg.edit, rec, with_feedback=True).run(s))
    assert [e.feedback_set for e in s.candidates[0].edits] == [0, 0, 1, 1]
    assert s.candidates[1].edits == []
    first, second = rec.requests["chat"]
    assert first.sampling.n == 2 and first.sampling.temperature == 0.7
    assert first.messages[-2] == {"role": "assistant", "content": "draft a"}
    assert first.messages[-1]["content"] == f"{templates.EDIT}\nF1\nF0\n<None>"
    assert second.messages[-1]["content"] == f"{templates.EDIT}\nF2\n<None>\n<None>"


def test_edit_without_feedback_uses_its_own_template(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", mode="edit_without_feedback")
    s = state(candidates=[Candidate(text="draft")])
    run(EditStep(cfg.edit, rec, with_feedback=False).run(s))
    [req] = rec.requests["chat"]
    assert req.messages[-1]["content"] == templates.EDIT_WITHOUT_FEEDBACK and req.sampling.temperature == 0.0
    assert [e.feedback_set for e in s.candidates[0].edits] == [None]


def test_select_logit_judge_scores_every_candidate_and_picks_the_best(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", select={"include_originals": True})
    edited = Candidate(text="four", feedback=[fb("not", 0)], feedback_sets=[[0]], edits=[Edit(text="It is 4.", feedback_set=0)])
    s = state(candidates=[edited, Candidate(text="4")])
    run(SelectStep(cfg.select, rec).run(s))
    texts = [r.messages[-2]["content"] for r in rec.requests["next_token_logprobs"]]
    assert texts == ["It is 4.", "four", "4"]  # the edit, its original (include_originals), the unedited response
    assert all(r.messages[-1]["content"] == templates.JUDGE and r.choices == ("Yes",) for r in rec.requests["next_token_logprobs"])
    scores = [s.candidates[0].edits[0].score, s.candidates[0].score, s.candidates[1].score]
    best = max(range(3), key=lambda k: scores[k])
    assert s.final == texts[best] and s.selected.score == scores[best]
    assert (s.selected.response, s.selected.edit, s.selected.feedback_set) == [(0, 0, 0), (0, None, None), (1, None, None)][best]


def test_select_single_candidate_is_not_scored(hf):
    rec = Recorder(hf)
    s = state(candidates=[Candidate(text="only")])
    run(SelectStep(make_config("unused").select, rec).run(s))
    assert s.final == "only" and s.selected.score is None and rec.requests["next_token_logprobs"] == []


def test_generative_select_knockout_has_a_unique_winner(hf):
    rec = Recorder(hf)
    cfg = make_config("unused", mode="best_of_n", select={"scorer": "generative", "group_size": 2, "max_tokens": 4})
    s = state(candidates=[Candidate(text=f"answer {i}") for i in range(5)])
    run(SelectStep(cfg.select, rec).run(s))
    scores = [c.score for c in s.candidates]
    assert scores.count(max(scores)) == 1 and s.final == f"answer {scores.index(max(scores))}"
    assert len(rec.requests["chat"]) == 4  # rounds: 2 contests (+1 bye), then 1 (+1 bye), then 1
    assert "[1]\nanswer 0" in rec.requests["chat"][0].messages[0]["content"]


def test_sequence_classification_scorer(tiny_classifier):
    rec = Recorder(HFBackend(BackendSpec(backend="hf", model=tiny_classifier, kind="classifier")))
    cfg = make_config("unused", mode="best_of_n", select={"scorer": "sequence_classification"})
    s = state(candidates=[Candidate(text="a"), Candidate(text="b")])
    run(SelectStep(cfg.select, rec).run(s))
    assert [r.messages[-1] for r in rec.requests["classify"]] == [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert s.selected.score == max(c.score for c in s.candidates)


def test_an_edit_reward_model_scores_each_edit_after_its_edit_conversation(tiny_classifier):
    """select.context edit (fescale's Edit RM): each edit is scored after the prompt, the initial
    response and the feedback of the set it answered, as `train.prepare.edit_prompt` trains it."""
    from actors.errors import ConfigError

    rec = Recorder(HFBackend(BackendSpec(backend="hf", model=tiny_classifier, kind="classifier")))
    cfg = make_config("unused", select={"scorer": "sequence_classification", "context": "edit"})
    cand = Candidate(
        text="four", feedback=[fb("not", 0), fb("mostly", 1)], feedback_sets=[[0], [1]],
        edits=[Edit(text="It is 4.", feedback_set=0), Edit(text="4, since 2 + 2 = 4.", feedback_set=1)],
    )
    s = state(candidates=[cand])
    run(SelectStep(cfg.select, rec, cfg.edit).run(s))
    for request, edit in zip(rec.requests["classify"], cand.edits):
        *conversation, last = request.messages
        assert last == {"role": "assistant", "content": edit.text}
        assert conversation == edit_conversation(cfg.edit, s.conversation(), cand, edit.feedback_set)
        assert "four" in str(conversation) and cand.feedback[edit.feedback_set].text in conversation[-1]["content"]
    assert s.selected.score == max(e.score for e in cand.edits)
    for bad in ({"scorer": "logit_judge"}, {"include_originals": True}):
        with pytest.raises(ConfigError, match="select.context edit ranks edits"):
            make_config("unused", select={"scorer": "sequence_classification", "context": "edit", **bad})


@pytest.mark.parametrize("mode", ["feedback_edit", "greedy", "best_of_n", "self_feedback_self_edit", "feedback_self_edit", "edit_without_feedback"])
def test_every_mode_runs_its_steps(hf, mode):
    n = 1 if mode == "greedy" else 2
    cfg = make_config("unused", mode=mode, generate={"num_responses": n})
    steps = build_steps(cfg, lambda role: hf)
    expected = {
        "feedback_edit": ["generate", "feedback", "filter", "edit", "select"],
        "self_feedback_self_edit": ["generate", "feedback", "filter", "edit", "select"],
        "feedback_self_edit": ["generate", "feedback", "filter", "edit", "select"],
        "greedy": ["generate", "select"],
        "best_of_n": ["generate", "select"],
        "edit_without_feedback": ["generate", "edit", "select"],
    }[mode]
    assert [step.name for step in steps] == expected
    s = run(run_steps(steps, state()))
    assert s.final is not None and len(s.candidates) == n
    assert set(s.usage) == set(expected) - {"filter"} - ({"select"} if mode == "greedy" else set())


def test_stop_reaches_the_answering_steps_and_a_seed_gives_each_call_its_own(hf):
    """`stop` ends responses and edits, never feedback; a request's `sampling_seed` becomes a distinct,
    reproducible seed per call (two calls never share their draws), and no seed leaves the backend's."""
    cfg = make_config("unused", mode="self_feedback_self_edit", sampling_seed=5, generate={"num_responses": 2, "stop": ["\n\n"], "max_tokens": 4},
                      feedback={"plan": "1@0.7", "max_tokens": 4}, edit={"stop": ["\n\n"], "max_tokens": 4})

    def sent(c):
        rec = Recorder(hf)
        run(run_steps(build_steps(c, lambda role: rec), state()))
        return [r.sampling for r in rec.requests["chat"]]

    samplings = sent(cfg)
    generate, feedback, edits = samplings[0], samplings[1:3], samplings[3:]
    assert generate.stop == ("\n\n",) and all(s.stop == ("\n\n",) for s in edits) and all(s.stop == () for s in feedback)
    seeds = [s.seed for s in samplings]
    assert None not in seeds and len(set(seeds)) == len(seeds) and sent(cfg) == samplings
    assert {s.seed for s in sent(make_config("unused", mode="self_feedback_self_edit", feedback={"plan": "1@0.7", "max_tokens": 4}))} == {None}


def test_a_streamed_answer_never_sends_a_stop_string_and_adds_up_to_the_final_text(hf):
    """Generate.stream (a greedy mode's answer) holds text back until it cannot start a stop string;
    the pieces add up to the final, cut text. A seeded sample gives varied text to cut in its middle."""
    base = make_config("unused", mode="greedy", generate={"max_tokens": 30, "temperature": 1.0}, seed=3)
    cfg = base.model_copy(update={"sampling_seed": 9})
    [plain] = build_steps(cfg, lambda role: hf)[:1]
    state = PromptState(id="s", messages=[Message(role="user", content="What is 2 + 2?")], mode="greedy", config_hash="x")
    asyncio.run(plain.run(state))
    text = state.candidates[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopping = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"stop": [stop]})})
    [step, _] = build_steps(stopping, lambda role: hf)
    assert step.is_answer
    cut = PromptState(id="s", messages=state.messages, mode="greedy", config_hash="x")

    async def pieces():
        return [p async for p in step.stream(cut)]

    sent = asyncio.run(pieces())
    assert len(sent) > 1 and stop not in "".join(sent)
    assert "".join(sent) == cut.candidates[0].text == text[: text.index(stop)]
