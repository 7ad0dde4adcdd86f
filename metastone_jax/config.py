"""Configuration: `Qwen2Config` (the Hugging Face `config.json` field names) and `RunConfig`, a training run.

A run is configured by a YAML preset (configs/<name>.yaml or a path) plus dotted `key=value` overrides, e.g.
`load_config("tiny", ["rl.steps=10", "comm.options={warmup_steps: 5}"])`; an unknown key or a bad value stops
with a message that names it, where it was set, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

import comms
from metastone_jax.data.arithmetic import ArithmeticTask
from metastone_jax.data.pipeline import ANSWER_FORMATS
from metastone_jax.sharding import MeshConfig

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2 causal LM (the policy) and of its SPRM head."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sprm_parameter_count(self) -> int:
        """Dense(C -> 2C) + Dense(2C -> 1): 2C^2 + 4C + 1."""
        c = self.hidden_size
        return 2 * c * c + 4 * c + 1

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; Qwen2 uses 'silu'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_hidden_layers < 2:
            raise ValueError("num_hidden_layers must be at least 2: the SPRM reads the input to the last layer")

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Qwen2Config":
        """Reads a Hugging Face Qwen2 config, refusing what this implementation would silently get wrong."""
        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise ValueError(f"{source}: model_type={model_type!r} is not supported; only 'qwen2' is")
        architectures = raw.get("architectures") or list(SUPPORTED_ARCHITECTURES)
        unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unsupported:
            raise ValueError(f"{source}: architecture {unsupported[0]!r} is not supported; only Qwen2ForCausalLM is")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope scaling {rope_type!r} is not supported; only default rotary embeddings are")
        if raw.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported; only full attention is")
        layer_types = raw.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{source}: layer_types other than 'full_attention' are not supported: {sorted(set(layer_types))}")
        head_dim = raw.get("head_dim")
        if head_dim is not None and head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
            raise ValueError(f"{source}: head_dim={head_dim} != hidden_size / num_attention_heads is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        kwargs.setdefault("num_key_value_heads", raw.get("num_attention_heads", cls.num_key_value_heads))
        if "rope_theta" not in raw and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The config.json that transformers and vLLM load as Qwen2ForCausalLM."""
        out = dataclasses.asdict(self)
        out.update(
            architectures=list(SUPPORTED_ARCHITECTURES),
            model_type="qwen2",
            rope_scaling=None,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            attention_dropout=0.0,
            torch_dtype=torch_dtype,
            use_cache=True,
        )
        return out


# ---------------------------------------------------------------------------------------------------------------------
# The run configuration: typed sections, loaded from a YAML preset plus dotted `key=value` overrides.

DTYPES = ("float32", "bfloat16", "float16")
# Test-time-scaling modes (2 / 8 / 32 sampled trajectories per question, see tts.py).
EVAL_MODES = ("low", "medium", "high")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# Trains on the embedded task on a 2-core CPU in minutes; the vocabulary leaves room above the task tokenizer's 222.
TINY_ARCHITECTURE = Qwen2Config(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy: a fresh Qwen2 of shape `architecture`, or the Hugging Face directory `pretrained`."""

    pretrained: str | None = None  # config.json + safetensors; its config.json then replaces `architecture`
    tokenizer: str | None = None  # tokenizer.json; None: the one in `pretrained`, else the embedded task's
    architecture: Qwen2Config = TINY_ARCHITECTURE
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: bool = False

    def qwen2_config(self) -> Qwen2Config:
        """The architecture actually built: `pretrained`'s config.json when set, else `architecture`."""
        return Qwen2Config.from_json(Path(self.pretrained) / "config.json") if self.pretrained else self.architecture


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Training problems: the embedded arithmetic task, or local JSONL/Parquet files when `files` is set."""

    arithmetic: ArithmeticTask = ArithmeticTask()
    files: tuple[str, ...] = ()
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "auto"  # see data.pipeline.file_dataset


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised warm-start on the reference solutions; steps=0 skips it."""

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 20


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO for the policy plus the SPR loss for the head (SPEC §6); steps=0 skips it."""

    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 4  # G sampled responses per prompt
    learning_rate: float = 3e-5
    head_learning_rate: float = 1e-5
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    sprm_backbone_grad_scale: float = 1e-4  # 0 detaches the head from the backbone
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48


@dataclasses.dataclass(frozen=True)
class CommConfig:
    """The relaxed-communication algorithm over the `data` axis: `comms.get(algorithm, **options)`."""

    algorithm: str = "pmean"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Save every `every` steps (0: only at the end), keep the last `keep`, write in the background."""

    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Test-time-scaling evaluation: `samples` trajectories for each of `questions` held-out questions."""

    questions: int = 32
    samples: int = 32
    modes: tuple[str, ...] = EVAL_MODES


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one `python -m metastone_jax.train` run needs; the defaults are configs/tiny.yaml."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    task: TaskConfig = TaskConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    comm: CommConfig = CommConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    run_dir: str | None = None  # None: runs/<timestamp>
    seed: int = 0
    log_every: int = 10


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
            f"{_dotted(path)}={raw!r} ({_where(path, sources)}) must be a section with keys: {', '.join(names)}")
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
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(annotation, str(annotation))


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
        fail("task.files", list(config.task.files),
             "the embedded task's tokenizer only covers arithmetic: with task.files also set model.tokenizer "
             "or model.pretrained")
