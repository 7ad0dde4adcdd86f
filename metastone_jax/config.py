"""Configuration dataclasses: `Qwen2Config` (the Hugging Face `config.json` field names) and `RunConfig`, a run.

Reading them from YAML presets and command-line overrides, with validation, is `metastone_jax.config_loading`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from metastone_jax.data.arithmetic import ArithmeticTask
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
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Qwen2Config:
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
            raise ValueError(
                f"{source}: rope scaling {rope_type!r} is not supported; only default rotary embeddings are"
            )
        if raw.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported; only full attention is")
        layer_types = raw.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"{source}: layer_types other than 'full_attention' are not supported: {sorted(set(layer_types))}"
            )
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
    def from_json(cls, path: str | Path) -> Qwen2Config:
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
    remat: bool = False  # recompute each layer in the backward pass (memory for compute)
    scan_layers: bool = True  # one compiled layer body; false unrolls the stack (faster on CPU, slower to compile)

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
    # Appended to each question of a model with a chat template; None: data.prompts.DEFAULT_INSTRUCTION, "": none.
    instruction: str | None = None


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
