"""The one way to load any fescale YAML (engine, training, judge, sweep grid) into a strict pydantic model.

Four kinds of config had four loaders and three error formats; sharing this kit makes a preset name or
a path, `--set a.b.c=value` overrides and every mistake behave the same everywhere: one `ConfigError`,
first line `invalid <what> (<source>):`, then one line per problem naming its key (for an unknown key,
the closest valid one). Hostile input is such an error too, never a traceback: bytes that are not UTF-8,
nesting that exhausts the YAML parser's recursion, an integer too long to convert or to fit in 64 bits;
quoted values are cut short so a huge one cannot flood the message.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from actors.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
MAX_SHOWN, MAX_LINE, MAX_PROBLEMS = 80, 400, 20  # characters of a quoted value, of a problem line; lines of an error


class StrictModel(BaseModel):
    """Base of every config section: an unknown key is an error (a typo never silently does nothing),
    so is assigning a bad value after loading, and so is an integer no size, count or seed can be."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, v: Any) -> Any:
        if isinstance(v, int) and v.bit_length() > 63:
            raise ValueError("integer too large (more than 64 bits)")
        return v


def error(what: str, source: str, *problems: str) -> ConfigError:
    """The one format: `invalid <what> (<source>):`, then one indented line per problem."""
    lines = [_cut(p, MAX_LINE) for p in problems[:MAX_PROBLEMS]]
    lines += [f"... and {len(problems) - MAX_PROBLEMS} more problems"] if len(problems) > MAX_PROBLEMS else []
    return ConfigError(f"invalid {what} ({_cut(source, MAX_SHOWN)}):\n  " + "\n  ".join(lines))


def short(value: Any) -> str:
    """A value as an error quotes it, cut short (a 5000-digit int has no repr at all)."""
    try:
        return _cut(repr(value), MAX_SHOWN)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def presets(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve(name_or_path: str | Path, presets_dir: Path | None, *, what: str) -> Path:
    """A YAML file as given, else the preset `<presets_dir>/<name>.yaml`; the error lists the presets."""
    for path in (Path(name_or_path), *([presets_dir / f"{name_or_path}.yaml"] if presets_dir else [])):
        if os.path.isfile(path):  # unlike Path.is_file, False (no OSError) for a name too long for the file system
            return path
    hint = f"; presets: {', '.join(presets(presets_dir))}" if presets_dir else ""
    raise error(what, str(name_or_path), f"does not exist: neither a file nor a preset{hint}")


def _parse_yaml(text: str) -> Any:
    """YAML text -> data; any failure is a ValueError of one readable line."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError("not valid YAML: nested too deeply") from None
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        raise ValueError(f"not valid YAML: {e.problem or e.context}{where}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer too long to convert
        raise ValueError(f"not valid YAML: {' '.join(str(e).split(';')[0].split())}") from None


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place: the one `--set`. The value is parsed as YAML (`4`,
    `true`, `[1, 2]`, `16@0.7`); an empty value is null."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {short(override)} is not KEY=VALUE (e.g. generate.num_responses=4)")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {short(override)}: `{'.'.join(parts[: i + 1])}` is not a section")
        node = child
    try:
        node[parts[-1]] = _parse_yaml(raw) if raw.strip() else None
    except ValueError as e:
        raise ConfigError(f"override {short(override)}: the value is {e}") from None


def read(source: str | Path | Mapping | None, *, what: str, presets_dir: Path | None = None) -> tuple[dict[str, Any], str]:
    """The mapping behind a source and the name its errors give: a preset name or YAML path, a mapping
    (copied: overrides never change the caller's) or None (defaults). An empty file is an error: `{}`
    says "all defaults" on purpose."""
    if source is None:
        return {}, "defaults"
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), "inline"
    path = resolve(source, presets_dir, what=what)
    try:
        data = _parse_yaml(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(what, str(path), f"cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(what, str(path), f"not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}") from None
    except ValueError as e:
        raise error(what, str(path), str(e)) from None
    if not isinstance(data, dict):
        raise error(what, str(path), "the file is empty (write `{}` for all defaults)" if data is None else f"the top level must be a mapping of keys, not a {type(data).__name__}")
    return data, str(path)


def validate(model_cls: type[M], data: dict[str, Any], overrides: Iterable[str] = (), *, what: str, source: str) -> M:
    """Apply the overrides to `data` (in place) and validate it; every problem is one line of one error."""
    try:
        for override in overrides:
            apply_override(data, override)
        return model_cls.model_validate(data)
    except ConfigError as e:
        raise error(what, source, str(e)) from None
    except ValidationError as e:
        raise error(what, source, *(_problem(err, model_cls) for err in e.errors())) from None


def load(model_cls: type[M], source: str | Path | Mapping | None, overrides: Iterable[str] = (), *, what: str, presets_dir: Path | None = None) -> M:
    """A preset name, YAML path, mapping or None (defaults), plus `key=value` overrides -> a validated model."""
    data, label = read(source, what=what, presets_dir=presets_dir)
    return validate(model_cls, data, overrides, what=what, source=label)


def _problem(err: dict, root: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key `{loc}`{_suggest(root, err['loc'][:-1], str(err['loc'][-1]))}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {short(value)})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"`{loc}`: {msg}{shown}" if loc else msg


def _suggest(root: type[BaseModel], parent_loc: tuple, name: str) -> str:
    """`; did you mean `x`?` among the keys of the section at `parent_loc`, else the valid keys."""
    ann: Any = root
    for part in (*parent_loc, None):  # a model's field, or a list index / dict key (-> the item type)
        members = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)  # `RoleConfig | None`
        model = next((m for m in members if isinstance(m, type) and get_origin(m) is None and issubclass(m, BaseModel)), None)
        if part is not None and model is not None:
            ann = getattr(model.model_fields.get(str(part)), "annotation", None)
        elif part is not None:
            ann = next((get_args(m)[-1] for m in members if get_args(m)), None)
    if model is None:
        return ""
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(model.model_fields)}"
