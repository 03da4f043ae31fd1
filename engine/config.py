"""fescale's config: YAML (+ `key=value` overrides) -> one validated `FescaleConfig`.

Every section is a strict pydantic model: an unknown key, a wrong type or an impossible
combination raises one `ConfigError` that names the key and says what to change (loading and its
errors are `engine.config_kit`'s, shared with the training, judge and sweep configs). Method knobs
default to the paper's values; the shipped YAML presets in `configs/` size them for a machine.

Example:
    >>> cfg = load_config("feedback_edit", ["generate.num_responses=4"])
    >>> cfg.generate.num_responses
    4
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from actors.registry import BUILTIN, IMPORT_PATH
from engine import templates
from engine.config_kit import StrictModel, load, presets, resolve, validate
from engine.modes import MODES, ModeName
from engine.serve_config import ServeConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
ROLES = ("generator", "feedback", "editor", "reward")
DEFAULT_TEMPERATURE = 0.7  # the paper's sampling temperature whenever more than one sample is drawn
# Reward scorers that read a local model's internals, by what they read (an endpoint cannot serve them).
LOCAL_SCORERS = {"sequence_classification": "a local classifier head", "token_logit": "a local causal LM's raw logits"}


class EndpointConfig(StrictModel):
    """An OpenAI-compatible HTTP endpoint (vLLM server, hosted API, fescale's Serve app)."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    timeout_s: PositiveFloat = 120.0
    max_retries: NonNegativeInt = 3
    max_concurrency: PositiveInt = 16


class RoleConfig(StrictModel):
    """Where and how one role's model runs. Roles with the same model+backend share one pool."""

    model: str = Field("embedded", description="'embedded' (SmolLM2), a local HF folder, a .gguf file, or the endpoint's model name")
    backend: str = Field("hf", description="hf, vllm, openai, or a 'package.module:Class' Backend subclass (actors.registry)")
    replicas: PositiveInt = 1
    num_gpus: NonNegativeInt = Field(0, description="GPUs per replica; the tensor-parallel size for vllm")
    num_cpus: PositiveFloat = 1.0
    threads: PositiveInt | None = Field(None, description="torch threads per replica (hf); default ceil(num_cpus)")
    batch_size: PositiveInt = Field(32, description="max sequences per forward pass (hf)")
    max_model_len: PositiveInt | None = Field(None, description="context length; default the model's own")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed through to vLLM / from_pretrained / the OpenAI request body")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of the replica processes")
    max_restarts: NonNegativeInt = Field(
        10, description="restarts of a replica that died (killed, OOM, crashed; a poison prompt costs up to pipeline.max_attempts + 1) allowed within restart_window_s; one more and its pool gives up on it"
    )
    restart_window_s: PositiveFloat = Field(
        600.0, description="the window of max_restarts: crashes spread over hours (a poison request now and then) never add up to a dead server"
    )
    endpoint: EndpointConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "RoleConfig":
        if self.backend not in BUILTIN and not IMPORT_PATH.match(self.backend):
            raise ValueError(f"backend {self.backend!r} is none of {', '.join(BUILTIN)} and not a 'package.module:Class' import path")
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend openai needs `endpoint: {base_url: ...}`")
        if self.backend != "openai" and self.endpoint is not None:
            raise ValueError(f"`endpoint` is only used by backend openai, not {self.backend}; remove it")
        tp = self.engine_kwargs.get("tensor_parallel_size")
        if tp is not None and tp != max(1, self.num_gpus):
            raise ValueError(
                f"engine_kwargs.tensor_parallel_size={tp} contradicts num_gpus={self.num_gpus}; "
                "num_gpus is the tensor-parallel size: set it and drop tensor_parallel_size"
            )
        if self.backend == "hf" and self.num_gpus > 1:
            raise ValueError(
                f"backend hf runs a replica on at most 1 GPU, got num_gpus={self.num_gpus}; "
                "use backend vllm for tensor parallelism or raise `replicas`"
            )
        return self

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, math.ceil(self.num_cpus))


class Roles(StrictModel):
    """The four roles. feedback, editor and reward default to the generator's model (one shared pool)."""

    generator: RoleConfig = Field(default_factory=RoleConfig)
    feedback: RoleConfig | None = None
    editor: RoleConfig | None = None
    reward: RoleConfig | None = None

    def get(self, role: str) -> RoleConfig:
        return getattr(self, role) or self.generator


class SamplingConfig(StrictModel):
    """Sampling of one stage. `temperature: null` means the paper's rule: greedy for one sample, else 0.7."""

    temperature: NonNegativeFloat | None = None
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: PositiveInt = 2048
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=4, description="up to 4 strings; an answer ends before the first (OpenAI's `stop`)")

    def temperature_for(self, n: int) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if n == 1 else DEFAULT_TEMPERATURE


class GenerateConfig(SamplingConfig):
    num_responses: PositiveInt = Field(1, description="N initial responses per prompt")


class PlanItem(StrictModel):
    count: PositiveInt
    temperature: NonNegativeFloat


_PLAN_ITEM = re.compile(r"^\s*(\d+)\s*@\s*([0-9.]+)\s*$")


class FeedbackConfig(StrictModel):
    """Feedback sampling, filtering/reranking and feedback-set forming."""

    plan: list[PlanItem] = Field(
        default_factory=lambda: [PlanItem(count=10, temperature=0.7)],
        description="(count, temperature) pairs; also the string form '16@0.7+16@0.6'",
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: PositiveInt = 512
    effective: PositiveInt | None = Field(None, description="keep the top E feedback after filtering; null keeps all")
    sets: Literal["random", "top", "partition"] = Field(
        "random",
        description="random: one set of up to set_size drawn from the kept (paper); top: one set of the best; partition: all kept, in rank order, in sets of set_size",
    )
    set_size: int = Field(3, ge=1, le=3)
    guided_level: bool = Field(
        False,
        description="sample the helpfulness level from the model's distribution over the five level words, then let it write the explanation (for small models that do not follow the template)",
    )
    template: str = templates.FEEDBACK

    @field_validator("plan", mode="before")
    @classmethod
    def _parse_plan(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.split("+")
        if isinstance(v, list):
            items = []
            for item in v:
                if isinstance(item, str):
                    m = _PLAN_ITEM.match(item)
                    if not m:
                        raise ValueError(f"plan item {item!r} is not 'COUNT@TEMPERATURE' (e.g. '16@0.7')")
                    item = {"count": int(m.group(1)), "temperature": float(m.group(2))}
                items.append(item)
            return items
        return v

    @field_validator("plan")
    @classmethod
    def _non_empty(cls, v: list[PlanItem]) -> list[PlanItem]:
        if not v:
            raise ValueError("plan needs at least one 'COUNT@TEMPERATURE' item")
        return v

    @property
    def samples(self) -> int:
        return sum(p.count for p in self.plan)

    @model_validator(mode="after")
    def _check(self) -> "FeedbackConfig":
        if self.effective is not None and self.effective > self.samples:
            raise ValueError(
                f"effective feedback E={self.effective} exceeds the {self.samples} feedback sampled per "
                "response by `plan`; lower `effective` or add samples to `plan`"
            )
        return self


class EditConfig(SamplingConfig):
    edits_per_set: PositiveInt = Field(1, description="K edits per feedback set")
    template: str = templates.EDIT
    joiner: str = "\n"
    filler: str = templates.EDIT_FILLER
    without_feedback_template: str = templates.EDIT_WITHOUT_FEEDBACK


class SelectConfig(StrictModel):
    """How the final candidates are scored (README "Reward scorers")."""

    scorer: Literal["logit_judge", "sequence_classification", "token_logit", "generative"] = "logit_judge"
    token_id: NonNegativeInt = Field(
        0,
        description="token_logit: the vocabulary id whose raw logit at the conversation's last position is the score "
        "(0 for Llama-3.3-Nemotron-70B-Select and Llama-3.1-Nemotron-70B-Reward)",
    )
    include_originals: bool = Field(False, description="also score the unedited responses as candidates")
    context: Literal["prompt", "edit"] = Field(
        "prompt",
        description="what a scalar scorer reads before a candidate: the prompt (a general reward model, as the paper's Select), "
        "or before each edit its edit conversation: prompt, initial response, its feedback set (the Edit RM's input, fescale train edit-rm)",
    )
    judge_template: str = templates.JUDGE
    target_token: str = "Yes"
    select_template: str = templates.SELECT
    group_size: int = Field(4, ge=2, description="candidates shown at once by the generative scorer (knockout rounds)")
    max_tokens: PositiveInt = Field(16, description="answer length of the generative scorer")


class PipelineConfig(StrictModel):
    """How rows stream through Ray Data (throughput only; results do not depend on it)."""

    # 32 x 4 rather than 8 x 16: the same prompts in flight, a quarter of Ray Data's per-batch work
    # (tasks, blocks, objects in the driver, the raylet and the stage actor): +23% prompts/s in
    # benchmarks.engine_overhead.
    batch_size: PositiveInt = Field(32, description="prompts per Ray Data batch")
    max_concurrent_batches: PositiveInt = Field(4, description="batches in flight per stage actor (each prompt moves through the steps on its own)")
    # 2: one stage actor is one Python process, and it tops out at ~0.75 of a core (its GIL, its
    # round trips to the replicas): 484 prompts/s alone, 611 as two, in benchmarks.engine_overhead.
    stage_actors: PositiveInt = Field(
        2, description="Ray Data actors running the method (and, in distill, writing shards), at most one per batch of the run; they hold no model"
    )
    stage_num_cpus: NonNegativeFloat = Field(0.1, description="logical CPUs reserved per stage actor")
    ready_timeout_s: PositiveFloat = Field(900.0, description="max wait for placement groups and model loading (also a restarting replica)")
    max_attempts: PositiveInt = Field(3, description="tries of one prompt's model call whose replica dies or hangs; then the prompt goes to the errors file")
    call_timeout_s: PositiveFloat | None = Field(None, description="a model call running longer counts as a hung replica: it is restarted and the call retried")


class FescaleConfig(StrictModel):
    mode: ModeName = "feedback_edit"
    seed: int = 0
    sampling_seed: NonNegativeInt | None = Field(
        None, description="seed every sampling call (a request's `seed`): same request, same answer; null: the backends' own random state, batched freely"
    )
    roles: Roles = Field(default_factory=Roles)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check(self) -> "FescaleConfig":
        spec = MODES[self.mode]
        if spec.single_response and self.generate.num_responses != 1:
            raise ValueError(
                f"mode {self.mode} draws one response, got generate.num_responses={self.generate.num_responses}; "
                "set it to 1 or use mode best_of_n"
            )
        seeded = [r for r, role in self.active_roles().items() if r != "reward" and role.backend == "vllm" and role.num_gpus == 0]
        if self.sampling_seed is not None and seeded:
            raise ValueError(
                f"sampling_seed (a request's `seed`) cannot be honoured by roles.{seeded[0]} (vllm on CPU: a per-request seed "
                "crashes its engine on large steps); it is seeded once by `seed`. Drop the seed or run that role on hf or a GPU"
            )
        reward = self.roles.get("reward")
        if self.select.scorer in LOCAL_SCORERS and reward.backend == "openai":
            raise ValueError(
                f"select.scorer {self.select.scorer} needs {LOCAL_SCORERS[self.select.scorer]} (roles.reward.backend hf or vllm); "
                "an OpenAI-compatible endpoint returns neither head scores nor raw logits"
            )
        if self.select.context == "edit" and (self.select.scorer not in LOCAL_SCORERS or spec.edit != "with_feedback" or self.select.include_originals):
            raise ValueError(
                "select.context edit ranks edits by their edit conversations (an Edit RM): it needs a scalar scorer "
                f"({', '.join(LOCAL_SCORERS)}), a mode that edits with feedback, and select.include_originals false (an unedited "
                f"response has no edit conversation); got scorer {self.select.scorer}, mode {self.mode}"
            )
        return self

    # -- derived views ------------------------------------------------------------------------
    @property
    def spec(self):
        return MODES[self.mode]

    def active_roles(self, mode: ModeName | None = None) -> dict[str, RoleConfig]:
        """The roles a mode (default: the config's) calls, after its routing (self-feedback uses the generator)."""
        spec = MODES[mode or self.mode]
        active = {"generator": self.roles.get("generator")}
        if spec.feedback:
            active["feedback"] = self.roles.get(spec.feedback_role)
        if spec.edit != "none":
            active["editor"] = self.roles.get(spec.editor_role)
        if spec.select:
            active["reward"] = self.roles.get("reward")
        return active

    def served_modes(self) -> list[str]:
        """The modes the Serve app accepts per request (its pools cover all their roles)."""
        return list(self.serve.modes or MODES)

    def role_kind(self, role: str) -> Literal["causal", "classifier", "token_logit"]:
        """How the role's model is loaded and read (`BackendSpec.kind`); a kind of its own is a pool of its own."""
        if role == "reward" and self.select.scorer == "sequence_classification":
            return "classifier"
        if role == "reward" and self.select.scorer == "token_logit":
            return "token_logit"
        return "causal"

    def config_hash(self) -> str:
        """Hash of everything that changes results (not replicas, batching or resources)."""
        data = self.model_dump(mode="json", exclude={"pipeline", "serve"})
        for role in ROLES:
            spec = self.roles.get(role).model_dump(mode="json")
            for k in ("replicas", "num_cpus", "threads", "batch_size", "env", "max_restarts", "restart_window_s"):
                spec.pop(k)
            data["roles"][role] = spec
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        for role in ROLES:  # show the inherited roles as they will run
            data["roles"][role] = self.roles.get(role).model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, width=100)


# -- loading: the config kit, with the presets in configs/ ------------------------------------------


def available_configs() -> list[str]:
    return presets(CONFIGS_DIR)


def resolve_config_path(name_or_path: str | Path) -> Path:
    return resolve(name_or_path, CONFIGS_DIR, what="config")


def load_config(name_or_path: str | Path | dict | None = "feedback_edit", overrides: list[str] | None = None) -> FescaleConfig:
    """Load a preset name, a YAML path or a mapping (None: defaults only), apply overrides, validate."""
    return load(FescaleConfig, name_or_path, overrides or (), what="config", presets_dir=CONFIGS_DIR)


def build_config(data: dict[str, Any], source: str = "config") -> FescaleConfig:
    """Validate a mapping already in hand (e.g. a per-request config); `source` names it in errors."""
    return validate(FescaleConfig, data, what="config", source=source)
