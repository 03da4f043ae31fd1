"""Per-request knobs -> the request's config: the Serve app's mapping and caps, without a server."""

import json

import pytest

from engine.config import PlanItem, load_config
from actors.errors import NotFoundError, RequestError
from engine.knobs import deadline_s, model_calls, request_config, served_models, spread, with_preset
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


def test_stop_ends_the_answering_stages_and_seed_seeds_every_sampling_call():
    base = load_config("feedback_edit")
    cfg = request_config(base, req(stop="5", seed=7))
    assert (cfg.generate.stop, cfg.edit.stop, cfg.seed, cfg.sampling_seed) == (["5"], ["5"], 7, 7)
    assert not hasattr(cfg.feedback, "stop")  # feedback is never the answer
    assert request_config(base, req(stop=["a", "b"])).generate.stop == ["a", "b"]
    plain = request_config(base, req())
    assert (plain.generate.stop, plain.sampling_seed) == ([], None)  # unseeded: the backends batch freely
    vllm_cpu = load_config("feedback_edit", ["roles.generator.backend=vllm"])
    with pytest.raises(RequestError, match=r"cannot be honoured by roles\.generator \(vllm on CPU"):
        request_config(vllm_cpu, req(seed=1))


@pytest.mark.parametrize(
    "body, param, pattern",
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4 strings"),
        ({"stop": ""}, "stop", "each of 1 to 256 characters"),
        ({"stop": ["x" * 257]}, "stop", "each of 1 to 256"),
        ({"stop": 5}, "stop", "a string or a list"),
        ({"stop": [["nested"]]}, "stop", "a string or a list"),
        ({"response_format": {"type": "json_object"}}, "response_format", 'response_format={"type": "json_object"} is not supported'),
        ({"response_format": "json"}, "response_format", "not supported"),
        ({"logprobs": True}, "logprobs", "log-probabilities are not returned"),
        ({"logprobs": 1}, "logprobs", "not supported"),
        ({"top_logprobs": 5}, "top_logprobs", "not supported"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
        ({"tools": [{"type": "function"}]}, "tools", "tool calling"),
        ({"tool_choice": "auto"}, "tool_choice", "tool calling"),
        ({"functions": [{"name": "f"}]}, "functions", "tool calling"),
        ({"presence_penalty": 0.5}, "presence_penalty", "repetition penalties"),
        ({"frequency_penalty": 1e308}, "frequency_penalty", "repetition penalties"),
        ({"frequency_penalty": False}, "frequency_penalty", "not supported"),
        ({"response_format": {"type": [[[{"a": "b" * 500}]]]}}, "response_format", r"\.\.\. is not supported"),  # shown cut short
    ],
)
def test_unsupported_or_bad_openai_parameters_are_refused_by_name(body, param, pattern):
    with pytest.raises(RequestError, match=pattern) as e:
        parse_request(json.dumps({"messages": HI, **body}).encode())
    assert e.value.param == param and error_response(e.value, "r")[0] == 400


def test_harmless_and_asking_nothing_parameters_are_accepted():
    asks_nothing = {"response_format": {"type": "text"}, "logprobs": False, "tool_choice": "none", "tools": [], "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": False, "stream_options": {"include_usage": True}}
    assert req(**asks_nothing, **harmless, stop=None).stop == []


def test_a_model_preset_gives_its_knobs_under_the_requests_own():
    presets = "serve.model_presets={fescale-greedy: {mode: greedy}, fescale-wide: {num_responses: 8, feedback_samples: 64, deadline_s: 7200}}"
    base = load_config("feedback_edit", [presets])
    assert served_models(base.serve) == ["fescale", "fescale-greedy", "fescale-wide"]
    assert request_config(base, with_preset(base.serve, req(model="fescale-greedy"))).mode == "greedy"
    mine = with_preset(base.serve, req(model="fescale-greedy", fescale={"mode": "best_of_n", "num_responses": 2}))
    assert (mine.fescale.mode, mine.fescale.num_responses) == ("best_of_n", 2)  # the request's own knobs win
    assert with_preset(base.serve, req(model=None)).fescale.mode is None
    # a preset is the operator's default for its model id: not capped (8 x 64 = 512 > 256), like the config's
    wide = with_preset(base.serve, req(model="fescale-wide"))
    assert request_config(base, wide).feedback.samples == 64 and deadline_s(base, wide) == 7200
    with pytest.raises(RequestError, match="max_feedback_per_request=256"):
        request_config(base, req(fescale={"num_responses": 8, "feedback_samples": 64}))  # the same asked by a request
    with pytest.raises(NotFoundError, match="model 'gpt-4o' does not exist; this server serves 'fescale', 'fescale-greedy', 'fescale-wide'"):
        with_preset(base.serve, req(model="gpt-4o"))


@pytest.mark.parametrize(
    "headers, pattern",
    [
        ({"X-Fescale-Retries": "3"}, r"header x-fescale-retries: unknown knob; valid: x-fescale-mode"),
        ({"x-fescale-num-responses": "many"}, r"header x-fescale-num-responses: .*integer"),
        ({"x-fescale-num-responses": "-1"}, r"header x-fescale-num-responses: .*greater than 0"),
        ({"x-fescale-num-responses": "0"}, r"header x-fescale-num-responses"),
        ({"x-fescale-num-responses": "9" * 5000}, r"header x-fescale-num-responses"),
        ({"x-fescale-num-responses": ""}, r"header x-fescale-num-responses"),
        ({"x-fescale-mode": "best_of_everything"}, r"header x-fescale-mode"),
        ({"x-fescale-deadline-s": "nan"}, r"header x-fescale-deadline-s"),
        ({"x-fescale-return-trace": "perhaps"}, r"header x-fescale-return-trace"),
    ],
)
def test_knobs_as_headers_are_checked_and_named(headers, pattern):
    with pytest.raises(RequestError, match=pattern):
        parse_request(json.dumps({"messages": HI}).encode(), headers=headers)


def test_knobs_as_headers_apply_and_the_body_wins():
    body = json.dumps({"messages": HI, "fescale": {"num_responses": 2}}).encode()
    req = parse_request(body, headers={"X-Fescale-Mode": "best_of_n", "X-Fescale-Num-Responses": "4", "X-Fescale-Return-Trace": "true", "Other": "x"})
    assert (req.fescale.mode, req.fescale.num_responses, req.fescale.return_trace) == ("best_of_n", 2, True)


@pytest.mark.parametrize("n, knobs, ok", [(1, {"mode": "greedy"}, True), (2, {"mode": "greedy"}, False), (4, {"mode": "best_of_n", "num_responses": 4}, True), (5, {"mode": "best_of_n", "num_responses": 4}, False)])
def test_n_is_at_most_the_candidates_a_request_makes(n, knobs, ok):
    base = load_config("feedback_edit")
    req = parse_request(json.dumps({"messages": HI, "n": n, "fescale": knobs}).encode())
    if ok:
        request_config(base, req)
    else:
        with pytest.raises(RequestError, match=rf"n={n}: .* at most"):
            request_config(base, req)
