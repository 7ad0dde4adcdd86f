"""Typed configuration: `Qwen2Config` (Hugging Face `config.json` names) and `RunConfig`, one section per concern.

Each field carries its default and its allowed values right here; pydantic checks types and ranges whenever a
section is built, from Python or from YAML (`metastone_jax.config_loading.load_config`). The defaults are the
released MetaStone-S1 recipe for Qwen2-1.5B; the presets in configs/ override what their scale changes.
Sections are read as they are by their consumers: the losses read `RLConfig`, the sampler `SamplingConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, Field

import comms
from metastone_jax.data.arithmetic import ArithmeticTask

# Test-time-scaling modes: sampled trajectories per question.
EVAL_MODES = {"low": 2, "medium": 8, "high": 32}
ANSWER_FORMATS = ("auto", "plain", "gsm8k", "boxed")
MESH_AXES = ("data", "fsdp", "tensor")

# A config section: a frozen dataclass whose fields pydantic validates; an unknown key is an error.
section = functools.partial(pydantic.dataclasses.dataclass, frozen=True, config=pydantic.ConfigDict(extra="forbid"))

# Integers are strict (YAML's `true` is not 1); floats take ints and the strings PyYAML makes of `1e-5`.
Count = Annotated[int, Field(strict=True, ge=0)]
PositiveCount = Annotated[int, Field(strict=True, ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(gt=0, le=1)]
Dtype = Literal["float32", "bfloat16", "float16"]


def _mesh_axis(size: int) -> int:
    if size != -1 and size < 1:
        raise ValueError("a mesh axis size must be a positive integer, or -1 for all remaining devices")
    return size


def _model_directory(path: str) -> str:
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    return path


def _existing_file(path: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{path} does not exist")
    return path


def _check_micro_batch(name: str, size: int, whole_name: str, whole: int) -> None:
    if size and whole % size:
        raise ValueError(f"{name}={size} does not divide {whole_name}={whole}; use a divisor of it, or 0 for all")


@section
class Qwen2Config:
    """Architecture of a Qwen2 causal LM (the policy) and of its SPRM head; the defaults are Qwen2-1.5B's."""

    vocab_size: PositiveCount = 151936
    hidden_size: PositiveCount = 1536
    intermediate_size: PositiveCount = 8960
    num_hidden_layers: Annotated[int, Field(strict=True, ge=2)] = 28  # the SPRM reads the input to the last layer
    num_attention_heads: PositiveCount = 12
    num_key_value_heads: PositiveCount = 2
    max_position_embeddings: PositiveCount = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sprm_parameter_count(self) -> int:
        """Dense(C -> 2C) + Dense(2C -> 1): 2C^2 + 4C + 1."""
        c = self.hidden_size
        return 2 * c * c + 4 * c + 1


@section
class ModelConfig:
    """The policy: a fresh Qwen2 of shape `architecture`, or the Hugging Face directory `pretrained`."""

    # config.json + safetensors (+ score_module.pt); its config.json then replaces `architecture`.
    pretrained: Annotated[str, AfterValidator(_model_directory)] | None = None
    # tokenizer.json; None: the one in `pretrained`, else the embedded task's.
    tokenizer: Annotated[str, AfterValidator(_existing_file)] | None = None
    architecture: Qwen2Config = Qwen2Config()
    dtype: Dtype = "bfloat16"  # activations
    param_dtype: Dtype = "float32"
    remat: bool = True  # recompute each layer in the backward pass (memory for compute)
    # Positions whose [batch, chunk, vocab] logits the losses hold at once, recomputed in the backward pass (0: the
    # whole sequence): the float32 logits of long sequences over a 150k vocabulary do not fit otherwise.
    logits_chunk: Count = 0
    scan_layers: bool = True  # one compiled layer body; false unrolls the stack (faster on CPU, slower to compile)

    def qwen2_config(self) -> Qwen2Config:
        """The architecture actually built: `pretrained`'s config.json when set, else `architecture`."""
        from metastone_jax.hf import read_config  # hf reads config.json into this module's Qwen2Config

        return read_config(Path(self.pretrained) / "config.json") if self.pretrained else self.architecture


@section
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; one of them may be -1 to take all remaining devices.

    `data` is the replica axis the communication algorithm runs over (the slow links); `fsdp` and `tensor` shard
    the model inside a replica group.
    """

    data: Annotated[int, AfterValidator(_mesh_axis)] = 1
    fsdp: Annotated[int, AfterValidator(_mesh_axis)] = -1
    tensor: Annotated[int, AfterValidator(_mesh_axis)] = 1

    def __post_init__(self):
        if self.sizes.count(-1) > 1:
            raise ValueError(f"mesh {self.describe()}: at most one axis may be -1 (take the remaining devices)")

    @property
    def sizes(self) -> list[int]:
        return [self.data, self.fsdp, self.tensor]

    def describe(self) -> str:
        return " x ".join(f"{name}={size}" for name, size in zip(MESH_AXES, self.sizes))

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The axis sizes on `num_devices` devices, -1 resolved; a sentence when they do not fit."""
        sizes = self.sizes
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {self.describe()}: {num_devices} devices are not divisible by the fixed axes' "
                    f"product {known}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise ValueError(
                f"mesh {self.describe()} needs {known} devices but {num_devices} are available; "
                f"make the product of the axis sizes equal {num_devices} or set one axis to -1"
            )
        return tuple(sizes)


@section
class TaskConfig:
    """Training problems: the embedded arithmetic task, or local JSONL/Parquet files when `files` is set."""

    arithmetic: ArithmeticTask = ArithmeticTask()
    files: tuple[Annotated[str, AfterValidator(_existing_file)], ...] = ()
    question_field: str = "question"
    answer_field: str = "answer"
    # How a record's answer field is read: plain, GSM8K's "#### 42", the last \boxed{}, or auto (per record).
    answer_format: Literal[ANSWER_FORMATS] = "auto"
    # Appended to each question of a model with a chat template; None: data.prompts.DEFAULT_INSTRUCTION, "": none.
    instruction: str | None = None


@section
class SFTConfig:
    """Supervised warm-start on the reference solutions; steps=0 skips it (the released runs start from a
    distilled model)."""

    steps: Count = 0
    batch_size: PositiveCount = 32
    learning_rate: NonNegative = 1e-5
    warmup_steps: Count = 20
    # The learning rate after the linear warm-up: `constant` at learning_rate, or `cosine` from learning_rate down
    # to 0 at `steps` (as DiLoCo's paper trains; a constant rate leaves each run at its own noise floor).
    decay: Literal["constant", "cosine"] = "constant"
    # Rows per micro-batch: one update accumulates the gradients of batch_size / micro_batch_size forward-backward
    # passes (0: one pass), equal to the one-pass update. A multiple of the `data` axis size.
    micro_batch_size: Count = 0

    def __post_init__(self):
        if self.decay == "cosine" and 0 < self.steps <= self.warmup_steps:
            raise ValueError(
                f"sft.decay=cosine decays after the warm-up, so sft.warmup_steps={self.warmup_steps} must be below "
                f"sft.steps={self.steps}"
            )
        _check_micro_batch("sft.micro_batch_size", self.micro_batch_size, "sft.batch_size", self.batch_size)


@section
class RLConfig:
    """GRPO for the policy plus the SPR loss for the head (docs/algorithms.md); steps=0 skips it.

    total loss = pg + spr_coef·SPR − entropy_coef·entropy + kl_coef·KL, read by `losses.rl_loss` as it is.
    """

    steps: Count = 100
    prompts_per_step: PositiveCount = 32
    group_size: Annotated[int, Field(strict=True, ge=2)] = 8  # responses per prompt (GRPO normalises in a group)
    learning_rate: NonNegative = 1e-6
    head_learning_rate: NonNegative = 1e-5  # the SPRM head's own AdamW
    clip_eps: Annotated[float, Field(gt=0)] = 0.2
    kl_coef: NonNegative = 0.001
    entropy_coef: NonNegative = 0.001
    spr_coef: NonNegative = 1.0
    # Fraction of the SPR gradient that reaches the backbone (0 detaches the head).
    sprm_backbone_grad_scale: Annotated[float, Field(ge=0, le=1)] = 1e-4
    # The released recipe keeps only the steps whose prediction agrees with the outcome (losses.spr_step_weights);
    # false trains the head on every step, the outcome labelling them all.
    spr_agreement_filter: bool = True
    # Train the head only on groups that hold both right and wrong responses: a group of one outcome labels every
    # step of a question alike, which teaches how hard the question is and nothing that ranks its responses.
    spr_mixed_groups_only: bool = False
    # The first RL steps train only the head (the policy's learning rate is 0), on rollouts of the starting policy.
    head_warmup_steps: Count = 0
    # Responses per micro-batch of the update (of prompts_per_step x group_size; 0: one pass), as sft's; exact for
    # GRPO and SPR, at the cost of one more forward without gradient (metastone_jax.step.make_rl_step).
    micro_batch_size: Count = 0
    # Prompts sampled at once, so that the KV cache of group_size responses each fits (0: all prompts_per_step).
    rollout_batch_size: Count = 0

    def __post_init__(self):
        if self.head_warmup_steps > self.steps:
            raise ValueError(
                f"rl.head_warmup_steps={self.head_warmup_steps} exceeds rl.steps={self.steps}; the warm-up is the "
                "first RL steps, so use at most rl.steps"
            )
        rows = self.prompts_per_step * self.group_size
        _check_micro_batch("rl.micro_batch_size", self.micro_batch_size, "rl.prompts_per_step x rl.group_size", rows)
        _check_micro_batch(
            "rl.rollout_batch_size", self.rollout_batch_size, "rl.prompts_per_step", self.prompts_per_step
        )


@section
class SamplingConfig:
    """How responses are sampled, for RL rollouts and evaluation alike. temperature 0 is greedy (top_p and top_k
    ignored); top_p 1 and top_k 0 switch those filters off."""

    max_new_tokens: PositiveCount = 8192
    temperature: NonNegative = 0.6
    top_p: Probability = 1.0
    top_k: Count = 0


@section
class CommConfig:
    """The relaxed-communication algorithm over the `data` axis: `comms.get(algorithm, **options)`."""

    algorithm: Literal[tuple(sorted(comms.ALGORITHMS))] = "pmean"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.algorithm == "hierarchical":
            raise ValueError(
                "comm.algorithm=hierarchical needs a train step that is manual over a fast replica axis besides "
                "`data`, which the trainer does not build; use onebit_adam (or onebit) over `data`"
            )
        self.build()

    def build(self) -> comms.CommAlgorithm:
        """The algorithm, its options checked against its fields (names, types and values)."""
        algorithm = comms.ALGORITHMS[self.algorithm]
        names = [f.name for f in dataclasses.fields(algorithm)]
        unknown = sorted(set(self.options) - set(names))
        if unknown:
            raise ValueError(f"{self.algorithm!r} has no option {unknown[0]!r}; its options are: {', '.join(names)}")
        try:
            return pydantic.TypeAdapter(algorithm).validate_python(self.options)
        except pydantic.ValidationError as e:
            error = e.errors()[0]
            key = ".".join(["options", *map(str, error["loc"])])
            raise ValueError(f"{key}={error['input']!r}: {error['msg'].removeprefix('Value error, ')}") from None


@section
class CheckpointConfig:
    """Save every `every` steps (0: only at the end), keep the last `keep`, write in the background."""

    every: Count = 100
    keep: PositiveCount = 3
    async_save: bool = True


@section
class EvalConfig:
    """Test-time-scaling evaluation: `samples` trajectories for each of `questions` held-out questions, every
    mode scored on the same samples in groups of k (low 2, medium 8, high 32)."""

    questions: Count = 32
    samples: PositiveCount = 32
    modes: tuple[Literal[tuple(EVAL_MODES)], ...] = tuple(EVAL_MODES)
    temperature: NonNegative | None = None  # None: the sampling section's

    def __post_init__(self):
        for mode in self.modes:
            k = EVAL_MODES[mode]
            if k > self.samples or self.samples % k:
                raise ValueError(
                    f"mode {mode!r} scores groups of k={k} samples, which samples={self.samples} does not split "
                    f"into; draw a multiple of {max(EVAL_MODES[m] for m in self.modes)} samples"
                )

    @property
    def ks(self) -> dict[str, int]:
        return {mode: EVAL_MODES[mode] for mode in self.modes}


@section
class RunConfig:
    """Everything one `python -m metastone_jax.train` run needs."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    task: TaskConfig = TaskConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    sampling: SamplingConfig = SamplingConfig()
    comm: CommConfig = CommConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    run_dir: str | None = None  # None: runs/<timestamp>
    seed: Count = 0

    def __post_init__(self):
        if self.task.files and self.model.pretrained is None and self.model.tokenizer is None:
            raise ValueError(
                "task.files needs model.tokenizer or model.pretrained: the embedded task's tokenizer only covers "
                "arithmetic"
            )

    @property
    def eval_sampling(self) -> SamplingConfig:
        """The sampling of the evaluation: the run's, at `eval.temperature` when that is set."""
        if self.eval.temperature is None:
            return self.sampling
        return dataclasses.replace(self.sampling, temperature=self.eval.temperature)
