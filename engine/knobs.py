"""One chat request -> the validated config it runs with: the server's config, the request's knobs, the caps.

A request may change the mode and the scaling axes (N, M, E, K) and the generator's sampling; it
never changes roles or models, so it always runs on the pools the server already loaded. A model id
of `serve.model_presets` gives the request that preset's knobs under its own (`with_preset`). The
result goes through the same validation as a YAML config, then through the server's caps.
"""

from __future__ import annotations

import math

from engine.config import FescaleConfig, PlanItem, build_config
from engine.serve_config import ServeConfig
from actors.errors import ConfigError, NotFoundError, RequestError
from engine.modes import MODES
from engine.openai_protocol import ChatCompletionRequest, FescaleKnobs


def spread(total: int, plan: list[PlanItem]) -> list[dict]:
    """`total` feedback samples over the plan's temperatures, as evenly as possible (10 over 4: 3,3,2,2)."""
    share, extra = divmod(total, len(plan))
    counts = [share + (i < extra) for i in range(len(plan))]
    return [{"count": c, "temperature": item.temperature} for c, item in zip(counts, plan) if c]


def served_models(serve: ServeConfig) -> list[str]:
    """The model ids a request may name (GET /v1/models): the server's own, then its presets."""
    return [serve.model_name, *serve.model_presets]


def with_preset(serve: ServeConfig, req: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with its model's preset knobs under the ones it sets itself; `NotFoundError` (404)
    for a model id this server does not serve."""
    if req.model in (None, serve.model_name):
        return req
    if req.model not in serve.model_presets:
        served = ", ".join(map(repr, served_models(serve)))
        raise NotFoundError(f"model {req.model!r} does not exist; this server serves {served}", param="model", code="model_not_found")
    knobs = {**serve.model_presets[req.model], **req.fescale.model_dump(exclude_unset=True)}
    return req.model_copy(update={"fescale": FescaleKnobs.model_validate(knobs)})


def request_config(base: FescaleConfig, req: ChatCompletionRequest) -> FescaleConfig:
    """The config of one request; `RequestError` (a 400) names the knob or cap that is out of bounds.

    A preset's own values are the operator's defaults for its model id: like the config's, they pass
    the caps (`check_caps`)."""
    preset = base.serve.model_presets.get(req.model or "")
    cfg = configured(base, req.fescale, req)
    check_caps(cfg, base, configured(base, FescaleKnobs.model_validate(preset)) if preset else None)
    if req.n > (most := final_candidates(cfg)):
        raise RequestError(
            f"n={req.n}: the n best candidates are returned, and mode {cfg.mode} with these knobs has at most {most}; "
            "ask for more candidates (fescale.num_responses, edits_per_set) or a smaller n", param="n"
        )
    return cfg


def configured(base: FescaleConfig, knobs: FescaleKnobs, req: ChatCompletionRequest | None = None) -> FescaleConfig:
    """`base` with the knobs and the request's sampling parameters applied, validated, not capped."""
    mode = knobs.mode or base.mode
    if mode not in base.served_modes():
        raise RequestError(f"fescale.mode {mode!r} is not served here; serve.modes: {', '.join(base.served_modes())}")
    data = base.model_dump(mode="json")
    data["mode"] = mode
    generate, feedback = data["generate"], data["feedback"]
    if knobs.num_responses is not None:
        generate["num_responses"] = knobs.num_responses
    elif MODES[mode].single_response:
        generate["num_responses"] = 1
    if knobs.feedback_samples is not None:
        feedback["plan"] = spread(knobs.feedback_samples, base.feedback.plan)
    if knobs.effective_feedback is not None:
        samples = knobs.feedback_samples or base.feedback.samples
        if knobs.effective_feedback > samples:
            raise RequestError(f"fescale.effective_feedback={knobs.effective_feedback} exceeds the {samples} feedback sampled per response (fescale.feedback_samples)")
        feedback["effective"] = knobs.effective_feedback
    elif knobs.feedback_samples is not None and base.feedback.effective and base.feedback.effective > knobs.feedback_samples:
        feedback["effective"] = knobs.feedback_samples  # fewer samples than the default E: keep them all
    if knobs.edits_per_set is not None:
        data["edit"]["edits_per_set"] = knobs.edits_per_set
    if req is not None:
        apply_sampling(data, req)
    try:
        return build_config(data, source="this request's fescale knobs")
    except ConfigError as e:
        raise RequestError(str(e)) from None


def apply_sampling(data: dict, req: ChatCompletionRequest) -> None:
    """The request's OpenAI sampling parameters into a config mapping. `stop` ends every text that can
    become the answer: the generator's responses and the editor's edits (not feedback, which the
    answer never shows). `seed` seeds every sampling call (`sampling_seed`) and the method's own
    random choices (`seed`: guided feedback levels, feedback sets)."""
    for key, value in (("max_tokens", req.generation_max_tokens), ("temperature", req.temperature), ("top_p", req.top_p)):
        if value is not None:
            data["generate"][key] = value
    if req.stop:
        data["generate"]["stop"] = data["edit"]["stop"] = req.stop
    if req.seed is not None:
        data["seed"] = data["sampling_seed"] = req.seed


def deadline_s(base: FescaleConfig, req: ChatCompletionRequest) -> float:
    """Seconds the request may run: its `fescale.deadline_s` (at most `serve.caps.max_deadline_s`) or the server's."""
    asked, cap = req.fescale.deadline_s, base.serve.caps.max_deadline_s
    if asked is None:
        return base.serve.deadline_s
    if asked > cap and asked != base.serve.model_presets.get(req.model or "", {}).get("deadline_s"):  # a preset's: the operator's
        raise RequestError(f"fescale.deadline_s={asked} exceeds this server's cap serve.caps.max_deadline_s={cap}", param="fescale.deadline_s")
    return asked


def final_candidates(cfg: FescaleConfig) -> int:
    """The most candidates select can rank for one prompt of this config (what `n` may ask for)."""
    n, spec = cfg.generate.num_responses, cfg.spec
    if spec.edit == "none":
        return n
    sets = 1
    if spec.edit == "with_feedback" and cfg.feedback.sets == "partition":
        m = cfg.feedback.samples
        sets = math.ceil(min(cfg.feedback.effective or m, m) / cfg.feedback.set_size)
    return n * sets * cfg.edit.edits_per_set + (n if cfg.select.include_originals else 0)


def model_calls(cfg: FescaleConfig) -> int:
    """The most model calls one prompt of this config can cause: sampled sequences (responses,
    feedback, edits), guided-level scorings and select's scorings. Each knob is capped on its own,
    but their product is what costs: N=16 with 64 feedback in partitioned sets and 4 edits each is
    thousands of calls from one request."""
    n, spec = cfg.generate.num_responses, cfg.spec
    calls = n + (n * cfg.feedback.samples + (n if cfg.feedback.guided_level else 0) if spec.feedback else 0)
    candidates = final_candidates(cfg)
    if spec.edit != "none":
        calls += candidates - (n if cfg.select.include_originals else 0)  # the edits
    if spec.select and candidates > 1:
        calls += candidates - 1 if cfg.select.scorer == "generative" else candidates  # knockout: at most one contest per loser
    return calls


def check_caps(cfg: FescaleConfig, base: FescaleConfig, preset: FescaleConfig | None = None) -> None:
    """Limits on what a request asks for; the server's own defaults (and its model preset's, `preset`)
    are the operator's choice, not capped."""
    caps = base.serve.caps

    def work(c: FescaleConfig) -> list[tuple[str, int, str]]:
        n, m = c.generate.num_responses, c.feedback.samples
        limits = [("fescale.num_responses", n, "max_responses"), ("max_tokens", c.generate.max_tokens, "max_tokens")]
        if c.spec.feedback:
            limits += [("fescale.feedback_samples", m, "max_feedback_samples"), ("num_responses x feedback_samples", n * m, "max_feedback_per_request")]
        if c.spec.edit != "none":
            limits.append(("fescale.edits_per_set", c.edit.edits_per_set, "max_edits_per_set"))
        limits.append(("model calls (responses, feedback, edits and scores)", model_calls(c), "max_model_calls"))
        return limits

    defaults = {(name, value) for c in (base, preset) if c is not None for name, value, _ in work(c)}
    for name, value, cap in work(cfg):
        if value > getattr(caps, cap) and (name, value) not in defaults:
            raise RequestError(f"{name}={value} exceeds this server's cap serve.caps.{cap}={getattr(caps, cap)}")
