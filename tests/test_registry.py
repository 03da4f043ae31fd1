"""Backends are found by name or import path (`actors.registry`), so a plugin or a test's fault
injector is installed from config, and a bad name is a clear error before anything starts."""

from __future__ import annotations

import pytest

from actors.backend import BackendSpec
from actors.errors import ConfigError
from actors.registry import BUILTIN, backend_class, make_backend
from benchmarks.faults import FaultyBackend, faulty_role
from engine.config import load_config


def test_builtin_names_resolve_to_their_classes():
    assert backend_class("openai").__name__ == "OpenAIBackend"
    assert set(BUILTIN) == {"hf", "vllm", "openai"}


@pytest.mark.parametrize(
    "name, message",
    [
        ("tpu", "unknown backend 'tpu'; use one of hf, vllm, openai"),
        ("", "unknown backend ''"),
        ("os.path:join", "is not a subclass of actors.backend.Backend"),
        ("no_such_module_xyz:Backend", "cannot be loaded: No module named 'no_such_module_xyz'"),
        ("actors.backend:Nope", "cannot be loaded"),
        ("a:b:c", "unknown backend"),
        ("\ud800:x", "unknown backend"),
    ],
)
def test_a_bad_backend_is_a_config_error_that_says_what_is_allowed(name, message):
    with pytest.raises(ConfigError, match=message):
        backend_class(name)


def test_a_role_with_a_bad_backend_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"roles.generator.*backend 'tpu' is none of hf, vllm, openai"):
        load_config("greedy", ["roles.generator.backend=tpu"])


def test_the_fault_injector_is_an_ordinary_backend_named_by_import_path(tiny_model):
    role = faulty_role({"model": tiny_model, "backend": "hf", "threads": 1}, crash_on="POISON")
    cfg = load_config("greedy", [f"roles.generator={role}"])
    assert cfg.roles.generator.backend == "benchmarks.faults:FaultyBackend"
    backend = make_backend(BackendSpec(role["backend"], tiny_model, engine_kwargs=role["engine_kwargs"]))
    assert isinstance(backend, FaultyBackend) and backend.crash_on == "POISON"
    assert backend.info()["backend"] == "hf"  # the real backend inside does the work
