"""Loading a `RunConfig`: a YAML preset (configs/<name>.yaml or a path) plus dotted `key=value` overrides.

A preset may start from another with `inherits: <preset>`; later layers win key by key. pydantic validates the
merged mapping against `RunConfig`, and every error becomes one sentence naming the key, the value, where it was
set (file and line, or the override) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import pydantic_core
import yaml

from metastone_jax.config import RunConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"
INHERITS = "inherits"
_ADAPTER = pydantic.TypeAdapter(RunConfig)


class ConfigError(ValueError):
    """A bad configuration, told in a sentence naming the key, where it was set and what is allowed."""


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A preset (a name in configs/ or a .yaml path; None = the tiny default) with `key=value` overrides applied."""
    raw: dict[str, Any] = {}
    sources: dict[tuple, str] = {}  # key path -> where it was set last
    for path in _inheritance_chain(preset or DEFAULT_PRESET):
        _merge(raw, _read_yaml(path, sources))
    for override in overrides:
        _apply_override(raw, override, sources)
    try:
        return _ADAPTER.validate_python(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(_sentence(e.errors()[0], sources)) from None


def to_yaml(config: RunConfig) -> str:
    """YAML that `load_config` reads back into an equal config."""
    return yaml.safe_dump(_ADAPTER.dump_python(config, mode="json"), sort_keys=False)


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


def _inheritance_chain(preset: str | Path) -> list[Path]:
    """The preset's files, the one it inherits from first."""
    chain = [_preset_path(preset)]
    while True:
        try:
            parent = (yaml.safe_load(chain[0].read_text()) or {}).get(INHERITS)
        except (yaml.YAMLError, AttributeError):
            return chain  # _read_yaml reports what is wrong with the file
        if parent is None:
            return chain
        relative = Path(str(parent))
        if relative.suffix in (".yaml", ".yml") and not relative.is_absolute():
            parent = chain[0].parent / relative  # a file next to the one that inherits it
        path = _preset_path(parent)
        if path in chain:
            raise ConfigError(f"{chain[0]}: `{INHERITS}: {parent}` makes a cycle of presets")
        chain.insert(0, path)


def _read_yaml(path: Path, sources: dict[tuple, str]) -> dict[str, Any]:
    """The mapping in `path` (without `inherits`), recording the line of every key in `sources`."""
    text = path.read_text()
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")

    def record(node: yaml.Node, prefix: tuple) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        seen = set()
        for key_node, value_node in node.value:
            line = f"{path}, line {key_node.start_mark.line + 1}"
            if key_node.value in seen:
                raise ConfigError(f"{line}: duplicate key {key_node.value!r}")
            seen.add(key_node.value)
            sources[(*prefix, key_node.value)] = line
            record(value_node, (*prefix, key_node.value))

    record(root, ())
    raw.pop(INHERITS, None)
    return raw


def _merge(into: dict, update: dict) -> None:
    """Deep merge: sections merge key by key, everything else is replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "options":
            _merge(into[key], value)
        else:
            into[key] = value


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


def _sentence(error: dict, sources: dict[tuple, str]) -> str:
    """One pydantic error as a sentence: the dotted key, its value, where it was set and what is allowed."""
    path = tuple(str(part) for part in error["loc"])
    key = ".".join(path)
    set_at = [where for at, where in sources.items() if at[: len(path)] == path]  # keys set inside a section
    where = next((sources[path[:end]] for end in range(len(path), 0, -1) if path[:end] in sources), None)
    where = where or "; ".join(dict.fromkeys(set_at)) or "defaults"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "unexpected_keyword_argument":
        names = [f.name for f in dataclasses.fields(_section_type(path[:-1]))]
        section = f"section {'.'.join(path[:-1])!r}" if len(path) > 1 else "the top level"
        return (
            f"unknown key {key!r} ({where}){_suggest(path[-1], names) or '.'} "
            f"The keys of {section} are: {', '.join(names)}"
        )
    if error["type"] == "value_error" and isinstance(error["input"], (dict, pydantic_core.ArgsKwargs)):
        # a check across the keys of a section
        return f"section {key or 'top level'!r} ({where}): {message}"
    return f"{key}={error['input']!r} ({where}): {message}"


def _section_type(path: tuple[str, ...]) -> type:
    """The dataclass of the section at `path` under RunConfig."""
    cls = RunConfig
    for name in path:
        cls = typing.get_type_hints(cls)[name]
    return cls


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
