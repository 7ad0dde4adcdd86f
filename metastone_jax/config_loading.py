"""Loading a `RunConfig`: a YAML preset (configs/<name>.yaml or a path) plus dotted `key=value` overrides.

`load_config("tiny", ["rl.steps=10", "comm.options={warmup_steps: 5}"])`; an unknown key or a bad value stops with
a message that names it, where it was set (file and line, or the override), and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

import comms
from metastone_jax.config import CONFIGS_DIR, DTYPES, EVAL_MODES, RunConfig
from metastone_jax.data.pipeline import ANSWER_FORMATS


class ConfigError(ValueError):
    """A bad configuration, told in a sentence naming the key, where it was set and what is allowed."""


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A preset (a name in configs/ or a .yaml path; None = the defaults) with dotted `key=value` overrides applied."""
    raw: dict[str, Any] = {}
    sources: dict[tuple, str] = {}
    if preset is not None:
        raw = _read_yaml(_preset_path(preset), sources)
    for override in overrides:
        _apply_override(raw, override, sources)
    config = _build(RunConfig, RunConfig(), raw, (), sources)
    _validate(config, sources)
    return config


def to_dict(config: Any) -> Any:
    """Plain YAML-ready data (dicts, lists, scalars) of a config or any of its sections."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def to_yaml(config: RunConfig) -> str:
    """YAML that `load_config` reads back into an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: RunConfig, run_dir: str | Path) -> Path:
    """Writes the resolved config to <run_dir>/config.yaml, so that a run can be reproduced or resumed."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config))
    return path


def resolve_run_dir(config: RunConfig) -> Path:
    """`config.run_dir`, or runs/<timestamp> when it is unset."""
    return Path(config.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def _preset_path(preset: str | Path) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    path = CONFIGS_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = preset_names()
        raise ConfigError(
            f"unknown preset {str(preset)!r}{_suggest(str(preset), names) or '.'} "
            f"The presets in {CONFIGS_DIR} are: {', '.join(names)} (or pass the path of a .yaml file)"
        )
    return path


class _LocatedDict(dict):
    """A YAML mapping that remembers the line of each of its keys."""

    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_located_mapping(loader: _Loader, node: yaml.MappingNode) -> _LocatedDict:
    loader.flatten_mapping(node)
    mapping = _LocatedDict()
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_located_mapping)


def _read_yaml(path: Path, sources: dict[tuple, str]) -> dict[str, Any]:
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")

    def record(mapping: dict, prefix: tuple) -> None:
        for key, value in mapping.items():
            sources[prefix + (key,)] = f"{path}, line {mapping.lines[key]}"
            if isinstance(value, _LocatedDict):
                record(value, prefix + (key,))

    record(raw, ())
    return raw


def _apply_override(raw: dict[str, Any], override: str, sources: dict[tuple, str]) -> None:
    key, sep, text = override.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value (e.g. rl.steps=10)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    section = raw
    for name in keys[:-1]:
        if not isinstance(section.get(name), dict):
            section[name] = {}
        section = section[name]
    section[keys[-1]] = value
    sources[keys] = f"override {override!r}"


def _where(path: tuple, sources: dict[tuple, str]) -> str:
    """Where `path` (or the nearest section above it) was set."""
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
    return "defaults"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Mismatch(Exception):
    pass


def _build(cls: type, default: Any, raw: Any, path: tuple, sources: dict[tuple, str]) -> Any:
    """`default` with the keys of `raw` replaced, each converted to its field's type; sections recurse."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{_dotted(path)}={raw!r} ({_where(path, sources)}) must be a section with keys: {', '.join(names)}"
        )
    hints = typing.get_type_hints(cls)
    changes = {}
    for key, value in raw.items():
        key_path = path + (key,)
        if key not in names:
            section = f"section {_dotted(path)!r}" if path else "the top level"
            raise ConfigError(
                f"unknown key {_dotted(key_path)!r} ({_where(key_path, sources)}){_suggest(str(key), names) or '.'} "
                f"The keys of {section} are: {', '.join(names)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            changes[key] = _build(hints[key], getattr(default, key), value, key_path, sources)
            continue
        try:
            changes[key] = _convert(value, hints[key])
        except _Mismatch:
            raise ConfigError(
                f"{_dotted(key_path)}={value!r} ({_where(key_path, sources)}) has the wrong type: "
                f"expected {_describe(hints[key])}"
            ) from None
    try:
        return dataclasses.replace(default, **changes)
    except (ValueError, TypeError) as e:
        where = "; ".join(sorted({_where(path + (k,), sources) for k in changes}))
        raise ConfigError(f"section {_dotted(path)!r} ({where}): {e}") from None


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (YAML gives lists for tuples, ints for floats); raises _Mismatch otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _convert(value, arm)
            except _Mismatch:
                pass
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # PyYAML reads `1e-5` (no dot) as a string, so numeric strings count as numbers too.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is list or args[-1] is Ellipsis:
            items = [_convert(v, args[0]) for v in value]
        elif len(value) == len(args):
            items = [_convert(v, a) for v, a in zip(value, args)]
        else:
            raise _Mismatch
        return tuple(items) if origin is tuple else items
    elif origin is dict and isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return dict(value)
    raise _Mismatch


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is list or args[-1] is Ellipsis:
            return f"a list of items, each {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return "a mapping of names to values"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        annotation, str(annotation)
    )


def _at_least(low, what=None):
    return (lambda v: v >= low), what or f"a value >= {low}"


def _one_of(choices: Sequence[str]):
    return (lambda v: v in choices), f"one of: {', '.join(choices)}"


_MESH_AXIS = (lambda v: v == -1 or v >= 1), "a positive integer, or -1 for all remaining devices"
# Value rules beyond the type: key -> (predicate, what is allowed).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.dtype": _one_of(DTYPES),
    "model.param_dtype": _one_of(DTYPES),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "task.answer_format": _one_of(ANSWER_FORMATS),
    "sft.steps": _at_least(0),
    "sft.batch_size": _at_least(1),
    "sft.learning_rate": _at_least(0),
    "sft.warmup_steps": _at_least(0),
    "rl.steps": _at_least(0),
    "rl.prompts_per_step": _at_least(1),
    "rl.group_size": _at_least(2, "an integer >= 2 (GRPO normalizes rewards within a group)"),
    "rl.learning_rate": _at_least(0),
    "rl.head_learning_rate": _at_least(0),
    "rl.clip_eps": ((lambda v: v > 0), "a number > 0"),
    "rl.kl_coef": _at_least(0),
    "rl.entropy_coef": _at_least(0),
    "rl.sprm_backbone_grad_scale": ((lambda v: 0 <= v <= 1), "a number in [0, 1] (0 detaches the head)"),
    "rl.temperature": _at_least(0, "a number >= 0 (0 is greedy)"),
    "rl.top_p": ((lambda v: 0 < v <= 1), "a number in (0, 1]"),
    "rl.max_new_tokens": _at_least(1),
    "comm.algorithm": _one_of(sorted(comms.ALGORITHMS)),
    "checkpoint.every": _at_least(0, "an integer >= 0 (0 saves only at the end)"),
    "checkpoint.keep": _at_least(1),
    "eval.questions": _at_least(0),
    "eval.samples": _at_least(1),
    "eval.modes": ((lambda v: set(v) <= set(EVAL_MODES)), f"a list of modes out of: {', '.join(EVAL_MODES)}"),
    "seed": _at_least(0),
    "log_every": _at_least(1),
}


def _validate(config: RunConfig, sources: dict[tuple, str]) -> None:
    """Value ranges, the communication options, and the files the run will need."""

    def fail(key: str, value: Any, allowed: str) -> None:
        path = tuple(key.split("."))
        raise ConfigError(f"{key}={value!r} ({_where(path, sources)}) is not allowed: expected {allowed}")

    for key, (allowed, description) in _RULES.items():
        value = config
        for name in key.split("."):
            value = getattr(value, name)
        if not allowed(value):
            fail(key, value, description)

    algorithm = comms.ALGORITHMS[config.comm.algorithm]
    hints = typing.get_type_hints(algorithm)
    option_types = {f.name: hints[f.name] for f in dataclasses.fields(algorithm)}
    for name, value in config.comm.options.items():
        if name in option_types:
            try:
                _convert(value, option_types[name])
            except _Mismatch:
                fail(f"comm.options.{name}", value, _describe(option_types[name]))
    try:
        comms.get(config.comm.algorithm, **config.comm.options)
    except (ValueError, TypeError) as e:
        fail("comm.options", config.comm.options, f"options of {config.comm.algorithm!r} ({e})")

    mesh = config.mesh
    if [mesh.data, mesh.fsdp, mesh.tensor].count(-1) > 1:
        fail("mesh", to_dict(mesh), "at most one axis of -1 (the one that takes the remaining devices)")
    model = config.model
    if model.pretrained is not None and not (Path(model.pretrained) / "config.json").is_file():
        fail("model.pretrained", model.pretrained, "a Hugging Face model directory with a config.json")
    if model.tokenizer is not None and not Path(model.tokenizer).is_file():
        fail("model.tokenizer", model.tokenizer, "an existing tokenizer.json file")
    for index, path in enumerate(config.task.files):
        if not Path(path).is_file():
            fail(f"task.files.{index}", path, "an existing .jsonl or .parquet file")
    if config.task.files and model.pretrained is None and model.tokenizer is None:
        fail(
            "task.files",
            list(config.task.files),
            "the embedded task's tokenizer only covers arithmetic: with task.files also set model.tokenizer "
            "or model.pretrained",
        )
