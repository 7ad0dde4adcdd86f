"""Configuration dataclasses. `Qwen2Config` mirrors the Hugging Face `config.json` field names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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
