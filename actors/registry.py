"""Backends by name: `make_backend(spec)` builds the backend a spec names, importing its engine only then.

The three built-in backends are registered by import path, so a CPU-only install never imports vLLM
and no backend module imports this one. `spec.backend` may also be an import path itself
("package.module:Class", a `Backend` subclass taking a `BackendSpec`): a backend of your own (a
plugin), or a wrapper around a built-in one, such as the fault-injection backend the tests and
`benchmarks.chaos` use (`benchmarks.faults`). The class is imported where the replica runs, so its
module must be importable there (installed, or shipped with the job's `runtime_env`).
"""

from __future__ import annotations

import importlib
import re

from actors.backend import Backend, BackendSpec
from actors.errors import ConfigError

BUILTIN = {
    "hf": "actors.hf_backend:HFBackend",
    "vllm": "actors.vllm_backend:VLLMBackend",
    "openai": "actors.openai_backend:OpenAIBackend",
}
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def backend_class(name: str) -> type[Backend]:
    """The class of a registered backend name or of a "module:Class" import path."""
    path = BUILTIN.get(name, name)
    if not IMPORT_PATH.match(path):
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(BUILTIN)} or a 'package.module:Class' import path")
    module, _, cls_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"backend {name!r} cannot be loaded: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend {name!r} is not a subclass of actors.backend.Backend")
    return cls


def make_backend(spec: BackendSpec) -> Backend:
    return backend_class(spec.backend)(spec)
