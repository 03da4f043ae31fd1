"""Per-request knobs -> the request's config: the Serve app's mapping and caps, without a server."""

import pytest

from engine.config import PlanItem, load_config
from actors.errors import RequestError
from engine.knobs import model_calls, request_config, spread
from engine.openai_protocol import ChatCompletionRequest, error_response, parse_request

HI = [{"role": "user", "content": "hi"}]


def req(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HI, **body})


def test_feedback_samples_spread_over_the_plan_temperatures():
    plan = [PlanItem(count=16, temperature=t) for t in (0.5, 0.6, 0.7, 0.8)]
    assert spread(10, plan) == [{"count": c, "temperature": t} for c, t in zip((3, 3, 2, 2), (0.5, 0.6, 0.7, 0.8))]
    assert spread(2, plan) == [{"count": 1, "temperature": 0.5}, {"count": 1, "temperature": 0.6}]


def test_knobs_and_sampling_reach_the_request_config():
    base = load_config("paper_70b")
    cfg = request_config(base, req(max_tokens=99, temperature=0.3, seed=5, fescale={"num_responses": 2, "feedback_samples": 8, "edits_per_set": 2}))
    assert (cfg.generate.num_responses, cfg.feedback.samples, cfg.edit.edits_per_set) == (2, 8, 2)
    assert [p.temperature for p in cfg.feedback.plan] == [0.5, 0.6, 0.7, 0.8]
    assert cfg.feedback.effective == 8  # the config's E=16 shrinks to the 8 sampled
    assert (cfg.generate.max_tokens, cfg.generate.temperature, cfg.seed) == (99, 0.3, 5)
    assert base.generate.num_responses == 8  # the server's config is untouched


def test_a_single_response_mode_gets_one_response_unless_asked():
    base = load_config("feedback_edit")
    assert request_config(base, req(fescale={"mode": "greedy"})).generate.num_responses == 1
    with pytest.raises(RequestError, match="mode greedy draws one response"):
        request_config(base, req(fescale={"mode": "greedy", "num_responses": 3}))


def test_caps_and_served_modes_are_enforced_by_name():
    base = load_config("feedback_edit", ["serve.caps.max_tokens=64", "serve.modes=[greedy, feedback_edit]"])
    with pytest.raises(RequestError, match=r"max_tokens=65 exceeds this server's cap serve\.caps\.max_tokens=64"):
        request_config(base, req(max_tokens=65))
    with pytest.raises(RequestError, match=r"num_responses x feedback_samples=320 exceeds .*max_feedback_per_request=256"):
        request_config(base, req(fescale={"num_responses": 5, "feedback_samples": 64}))
    with pytest.raises(RequestError, match="fescale.mode 'best_of_n' is not served here"):
        request_config(base, req(fescale={"mode": "best_of_n"}))


def test_parse_request_names_the_problem():
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_request(b"{")
    with pytest.raises(RequestError, match="fescale.edits_per_set: Input should be greater than 0") as e:
        parse_request(b'{"messages": [{"role": "user", "content": "x"}], "fescale": {"edits_per_set": 0}}')
    assert error_response(e.value, "r1") == (400, {"error": {"message": str(e.value), "type": "invalid_request_error", "param": "fescale.edits_per_set", "code": "invalid_request"}})
    parts = parse_request(b'{"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}')
    assert parts.conversation() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]


def test_the_servers_own_defaults_are_not_capped():
    base = load_config("paper_70b")  # N=8 x M=64 = 512 feedback, above the default cap of 256
    assert request_config(base, req()).feedback.samples == 64
    with pytest.raises(RequestError, match="max_feedback_per_request=256"):
        request_config(base, req(fescale={"num_responses": 16}))


def test_the_model_calls_a_request_causes_are_capped_in_all():
    """Each knob within its cap can still multiply into thousands of calls: 64 feedback per response,
    all kept, in partitioned sets of 3 (22 per response) with 4 edits each is 704 edits to write and
    704 to score."""
    base = load_config("paper_70b")
    assert (base.feedback.guided_level, base.select.include_originals, base.feedback.sets) == (False, False, "partition")
    assert model_calls(base) == 8 + 8 * 64 + 8 * 6 + 8 * 6  # responses, feedback, edits of 6 sets (E=16), scores
    assert model_calls(load_config("greedy")) == 1
    wide = {"feedback_samples": 64, "effective_feedback": 64, "edits_per_set": 4}
    with pytest.raises(RequestError, match=r"model calls \(responses, feedback, edits and scores\)=1928 exceeds this server's cap serve\.caps\.max_model_calls=1024"):
        request_config(base, req(fescale=wide))
    assert model_calls(request_config(base, req(fescale={**wide, "edits_per_set": 1}))) == 8 + 512 + 176 + 176
