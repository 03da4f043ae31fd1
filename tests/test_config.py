"""Config: presets load, overrides apply, and every bad value is one error that names its key."""

import pytest

from engine.config import available_configs, build_config, load_config
from actors.errors import ConfigError


def test_every_preset_loads_and_the_modes_are_all_there():
    names = available_configs()
    for mode in ["feedback_edit", "greedy", "best_of_n", "self_feedback_self_edit", "feedback_self_edit", "edit_without_feedback"]:
        assert mode in names
        assert load_config(mode).mode == mode
    assert "paper_70b" in names
    for name in names:
        load_config(name)


def test_paper_70b_reproduces_the_optimal_setup():
    cfg = load_config("paper_70b")
    assert cfg.generate.num_responses == 8
    assert [(p.count, p.temperature) for p in cfg.feedback.plan] == [(16, 0.5), (16, 0.6), (16, 0.7), (16, 0.8)]
    assert cfg.feedback.effective == 16 and cfg.feedback.samples == 64
    assert {cfg.roles.get(r).backend for r in ("generator", "feedback", "editor", "reward")} == {"vllm"}
    assert cfg.roles.get("generator").num_gpus == 8
    assert (cfg.select.scorer, cfg.select.token_id) == ("token_logit", 0)  # Select is a causal LM read at token 0


def test_overrides_parse_yaml_values_and_plan_strings():
    cfg = load_config("feedback_edit", ["generate.num_responses=4", "feedback.plan=16@0.7+16@0.6", "select.include_originals=true"])
    assert cfg.generate.num_responses == 4
    assert [(p.count, p.temperature) for p in cfg.feedback.plan] == [(16, 0.7), (16, 0.6)]
    assert cfg.feedback.samples == 32
    assert cfg.select.include_originals is True


def test_defaults_are_the_papers():
    cfg = build_config({})
    assert cfg.mode == "feedback_edit"
    assert cfg.generate.num_responses == 1 and cfg.generate.temperature_for(1) == 0.0
    assert cfg.generate.temperature_for(8) == 0.7 and cfg.generate.top_p == 0.9
    assert [(p.count, p.temperature) for p in cfg.feedback.plan] == [(10, 0.7)]
    assert cfg.feedback.sets == "random" and cfg.feedback.set_size == 3
    assert cfg.edit.edits_per_set == 1 and cfg.edit.temperature_for(1) == 0.0 and cfg.edit.temperature_for(4) == 0.7


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["generate.num_respones=2"], "unknown key `generate.num_respones`; did you mean `num_responses`?"),
        (["roles.generator.modle=x"], "unknown key `roles.generator.modle`; did you mean `model`?"),
        (["bogus=1"], "unknown key `bogus`"),
        (["generate.num_responses=zero"], "`generate.num_responses`"),
        (["generate.num_responses=0"], "`generate.num_responses`: Input should be greater than 0"),
        (["generate.top_p=1.5"], "`generate.top_p`"),
        (["feedback.plan=16at0.7"], "is not 'COUNT@TEMPERATURE'"),
        (["feedback.effective=20"], "effective feedback E=20 exceeds the 3 feedback sampled"),
        (["feedback.set_size=4"], "`feedback.set_size`"),
        (["mode=greedy"], "mode greedy draws one response, got generate.num_responses=2"),
        (["mode=fancy"], "`mode`"),
        (["roles.generator.num_gpus=2"], "backend hf runs a replica on at most 1 GPU"),
        (["roles.generator.backend=openai"], "backend openai needs `endpoint"),
        (["roles.generator.backend=vllm", "roles.generator.engine_kwargs={tensor_parallel_size: 2}"], "tensor_parallel_size=2 contradicts num_gpus=0"),
        (["roles.reward.backend=openai", "roles.reward.endpoint.base_url=http://x", "select.scorer=sequence_classification"], "needs a local classifier"),
        (["generate"], "is not KEY=VALUE"),
        # the Serve app's limits: zero, negative, wrong type and huge values are refused at load
        (["serve.max_request_bytes=0"], "`serve.max_request_bytes`: Input should be greater than 0"),
        (["serve.max_request_bytes=-1"], "`serve.max_request_bytes`"),
        (["serve.max_request_bytes=1MB"], "`serve.max_request_bytes`"),
        ([f"serve.max_messages={10**30}"], "`serve.max_messages`"),
        (["serve.max_json_depth=0"], "`serve.max_json_depth`"),
        (["serve.caps.max_model_calls=0"], "`serve.caps.max_model_calls`"),
        (["serve.allow_unauthenticated=maybe"], "`serve.allow_unauthenticated`"),
        (["serve.openapi=[1]"], "`serve.openapi`"),
        (["serve.api_keys=['**********']"], "the mask of a printed config"),
        # stop strings, a sampling seed the engine cannot honour, model presets: refused at load, by name
        (["generate.stop=[a, b, c, d, e]"], "`generate.stop`"),
        (["edit.stop=['']"], "`edit.stop.0`"),
        (["sampling_seed=3", "roles.generator.backend=vllm"], "sampling_seed (a request's `seed`) cannot be honoured by roles.generator (vllm on CPU"),
        (["serve.model_presets={fescale-x: {retries: 3}}"], "model_presets.fescale-x.retries: unknown knob; valid: mode, num_responses"),
        (["serve.model_presets={fescale-x: {num_responses: 0}}"], "model_presets.fescale-x.num_responses: Input should be greater than 0"),
        (["serve.model_presets={fescale-x: greedy}"], "model_presets.fescale-x"),
        (["serve.model_presets={fescale-x: {mode: greedy}}", "serve.modes=[feedback_edit]"], "model_presets.fescale-x.mode: 'greedy' is not in serve.modes"),
        (["serve.model_presets={fescale: {mode: greedy}}"], "'fescale' is not a new model id"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config("feedback_edit", overrides)
    assert needle in str(err.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a preset; presets: .*feedback_edit"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_roles_inherit_the_generator_and_modes_route_them():
    cfg = load_config("feedback_edit")
    assert cfg.roles.feedback is None and cfg.roles.get("feedback") == cfg.roles.generator
    assert set(cfg.active_roles()) == {"generator", "feedback", "editor", "reward"}
    assert set(load_config("greedy").active_roles()) == {"generator"}
    assert set(load_config("best_of_n").active_roles()) == {"generator", "reward"}
    assert set(load_config("edit_without_feedback").active_roles()) == {"generator", "editor", "reward"}
    own = build_config({"mode": "self_feedback_self_edit", "roles": {"feedback": {"model": "/elsewhere"}, "editor": {"model": "/elsewhere"}}})
    active = own.active_roles()
    assert active["feedback"] == active["generator"] == active["editor"]  # the generator critiques and edits
    fse = build_config({"mode": "feedback_self_edit", "roles": {"feedback": {"model": "/fb"}, "editor": {"model": "/ed"}}})
    assert fse.active_roles()["feedback"].model == "/fb" and fse.active_roles()["editor"].model == "embedded"


def test_config_hash_tracks_results_not_resources():
    base = load_config("feedback_edit")
    assert load_config("feedback_edit", ["roles.generator.replicas=3", "pipeline.batch_size=2"]).config_hash() == base.config_hash()
    assert load_config("feedback_edit", ["seed=1"]).config_hash() != base.config_hash()
    assert load_config("feedback_edit", ["feedback.effective=1"]).config_hash() != base.config_hash()


def test_print_config_shows_inherited_roles():
    text = load_config("greedy").to_yaml()
    assert "reward:\n    model: embedded" in text


def test_api_keys_never_appear_in_a_printed_or_written_config(monkeypatch):
    from engine.serve_app import api_keys, serve_config_file

    monkeypatch.setenv("FESCALE_API_KEYS", "from-env-1, from-env-2")
    cfg = load_config("feedback_edit", ["serve.api_keys=[in-config-key]"])
    assert api_keys(cfg) == ["in-config-key", "from-env-1", "from-env-2"]
    for text in (cfg.to_yaml(), serve_config_file(cfg), repr(cfg), str(cfg.model_dump())):
        assert "in-config-key" not in text and "from-env" not in text


@pytest.mark.parametrize(
    "host, keys, allow, refused",
    [
        ("127.0.0.1", "", False, False),
        ("localhost", "", False, False),
        ("::1", "", False, False),
        ("0.0.0.0", "", False, True),
        ("10.1.2.3", "", False, True),
        ("example.internal", "", False, True),
        ("0.0.0.0", "k1", False, False),
        ("0.0.0.0", "", True, False),
    ],
)
def test_serving_beyond_loopback_without_keys_is_refused_unless_asked_for(monkeypatch, host, keys, allow, refused):
    from engine.serve_app import api_keys, check_exposure

    monkeypatch.setenv("FESCALE_API_KEYS", keys)
    cfg = load_config("feedback_edit", [f"serve.host={host}", f"serve.allow_unauthenticated={str(allow).lower()}"])
    if refused:
        with pytest.raises(ConfigError, match=r"no API key is set: set FESCALE_API_KEYS .* serve.allow_unauthenticated=true"):
            check_exposure(cfg, api_keys(cfg))
    else:
        check_exposure(cfg, api_keys(cfg))
