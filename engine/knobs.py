"""One chat request -> the validated config it runs with: the server's config, the request's knobs, the caps.

A request may change the mode and the scaling axes (N, M, E, K) and the generator's sampling; it
never changes roles or models, so it always runs on the pools the server already loaded. The result
goes through the same validation as a YAML config, then through the server's caps.
"""

from __future__ import annotations

import math

from engine.config import FescaleConfig, PlanItem, build_config
from actors.errors import ConfigError, RequestError
from engine.modes import MODES
from engine.openai_protocol import ChatCompletionRequest


def spread(total: int, plan: list[PlanItem]) -> list[dict]:
    """`total` feedback samples over the plan's temperatures, as evenly as possible (10 over 4: 3,3,2,2)."""
    share, extra = divmod(total, len(plan))
    counts = [share + (i < extra) for i in range(len(plan))]
    return [{"count": c, "temperature": item.temperature} for c, item in zip(counts, plan) if c]


def request_config(base: FescaleConfig, req: ChatCompletionRequest) -> FescaleConfig:
    """The config of one request; `RequestError` (a 400) names the knob or cap that is out of bounds."""
    knobs = req.fescale
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
    for key, value in (("max_tokens", req.generation_max_tokens), ("temperature", req.temperature), ("top_p", req.top_p)):
        if value is not None:
            generate[key] = value
    if req.seed is not None:
        data["seed"] = req.seed
    try:
        cfg = build_config(data, source="this request's fescale knobs")
    except ConfigError as e:
        raise RequestError(str(e)) from None
    check_caps(cfg, base)
    return cfg


def model_calls(cfg: FescaleConfig) -> int:
    """The most model calls one prompt of this config can cause: sampled sequences (responses,
    feedback, edits), guided-level scorings and select's scorings. Each knob is capped on its own,
    but their product is what costs: N=16 with 64 feedback in partitioned sets and 4 edits each is
    thousands of calls from one request."""
    n, spec = cfg.generate.num_responses, cfg.spec
    calls, sets = n, 1
    if spec.feedback:
        m = cfg.feedback.samples
        calls += n * m + (n if cfg.feedback.guided_level else 0)
        if cfg.feedback.sets == "partition":
            sets = math.ceil(min(cfg.feedback.effective or m, m) / cfg.feedback.set_size)
    candidates = n
    if spec.edit != "none":
        edits = n * (sets if spec.edit == "with_feedback" else 1) * cfg.edit.edits_per_set
        calls += edits
        candidates = edits + (n if cfg.select.include_originals else 0)
    if spec.select and candidates > 1:
        calls += candidates - 1 if cfg.select.scorer == "generative" else candidates  # knockout: at most one contest per loser
    return calls


def check_caps(cfg: FescaleConfig, base: FescaleConfig) -> None:
    """Limits on what a request asks for; the server's own defaults are the operator's choice, not capped."""
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

    defaults = {name: value for name, value, _ in work(base)}
    for name, value, cap in work(cfg):
        if value > getattr(caps, cap) and value != defaults.get(name):
            raise RequestError(f"{name}={value} exceeds this server's cap serve.caps.{cap}={getattr(caps, cap)}")
