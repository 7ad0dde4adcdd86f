"""The reflective model: the Qwen2 policy and the SPRM head on one backbone, in one forward pass."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metastone_jax.config import Qwen2Config
from metastone_jax.models.qwen2 import HeadProjection, KVCache, Qwen2Model
from metastone_jax.models.sprm import SPRMHead
from metastone_jax.sharding import LOGICAL_RULES, fit_spec

Dtype = Any
# params[HEAD] holds the SPRM head (the name of its attribute in ReflectiveModel.setup); the rest is the policy.
HEAD = "sprm"


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [batch, seq, vocab] float32, None when called with_logits=False
    features: jax.Array  # [batch, seq, hidden]: input to the last decoder layer (transformers' hidden_states[-2])
    step_logits: jax.Array | None  # [batch, seq] float32 SPRM logits, None without a head
    cache: KVCache | None
    hidden: jax.Array  # [batch, seq, hidden]: the final (normed) hidden states, logits = project(hidden)


class ReflectiveModel(nn.Module):
    """Parameters: {"model": backbone, "lm_head": untied head (absent when tied), "sprm": head (when with_head)}."""

    config: Qwen2Config
    with_head: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = True

    def setup(self):
        cfg = self.config
        self.model = Qwen2Model(cfg, self.dtype, self.param_dtype, self.remat, self.scan_layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = HeadProjection(
                (cfg.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                stddev=cfg.initializer_range,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        if self.with_head:
            self.sprm = SPRMHead(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        *,
        deterministic: bool = True,
        sprm_backbone_grad_scale: float = 1.0,
        with_logits: bool = True,
    ) -> ModelOutput:
        """tokens [batch, seq] at cache slots [cache_index, cache_index + seq).

        positions [batch, seq] default 0..seq-1; kv_mask [batch, kv_len] marks valid key slots (kv_len is the cache
        length with a cache, seq without); `sprm_backbone_grad_scale` is the fraction of the SPR gradient that
        reaches the backbone (0 detaches the head). `with_logits=False` skips the LM head: the losses then
        `project` the hidden states a chunk of positions at a time (losses.chunked_next_token_scores).
        """
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(seq), (batch, seq))
        if kv_mask is None:
            kv_len = seq if cache is None else cache["k"].shape[2]
            kv_mask = jnp.ones((batch, kv_len), bool)
        hidden, features, cache = self.model(tokens, positions, kv_mask.astype(bool), cache, cache_index)
        logits = self.project(hidden) if with_logits else None
        step_logits = None
        if self.with_head:
            # f·s + sg(f)·(1−s) written so that the forward value is f bit for bit: f − sg(f) is exactly 0.
            detached = jax.lax.stop_gradient(features)
            head_input = detached + sprm_backbone_grad_scale * (features - detached)
            step_logits = self.sprm(head_input, positions, deterministic=deterministic)
        return ModelOutput(logits, features, step_logits, cache, hidden)

    def project(self, hidden: jax.Array) -> jax.Array:
        """The LM head: final hidden states [batch, seq, hidden] -> float32 logits [batch, seq, vocab]."""
        logits = self.model.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


@functools.cache
def abstract_params(module: ReflectiveModel) -> Any:
    """The parameters' shapes and dtypes in their logical-axis boxes (`nn.LogicallyPartitioned`), traced once per
    module: the shardings, the train state's layout and the HF loader all read them."""
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


@functools.cache
def param_shardings(module: ReflectiveModel, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings of every parameter on `mesh` through the logical-axis rules table.

    A dimension that the mapped mesh axes do not divide (a vocabulary of 97 over 2 devices) stays replicated.
    """
    abstract = abstract_params(module)
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)
    return jax.tree.map(
        lambda box, spec: jax.sharding.NamedSharding(mesh, fit_spec(spec, box.value.shape, mesh)),
        abstract,
        specs,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def init_params(
    module: ReflectiveModel, key: jax.Array, mesh: jax.sharding.Mesh | None = None, *, only: str | None = None
) -> Any:
    """Randomly initialised parameters (plain arrays), created directly in their sharding when `mesh` is given.

    `only` names one top-level entry to initialise alone, e.g. `only=HEAD` for a pretrained backbone without a
    head (the compiler drops the rest; the values equal those of a full initialisation).
    """

    def init(key):
        params = nn.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
        return params if only is None else params[only]

    if mesh is None:
        return jax.jit(init)(key)
    shardings = param_shardings(module, mesh)
    return jax.jit(init, out_shardings=shardings if only is None else shardings[only])(key)


@dataclasses.dataclass
class Model:
    """A ReflectiveModel with its parameters (and the mesh they live on): call it on token ids."""

    module: ReflectiveModel
    params: Any
    mesh: jax.sharding.Mesh | None = None

    @property
    def config(self) -> Qwen2Config:
        return self.module.config

    def __call__(self, tokens: jax.Array, **kwargs) -> ModelOutput:
        """tokens [batch, seq] int -> ModelOutput(logits, features, step_logits, cache); kwargs as ReflectiveModel."""
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                stack.enter_context(jax.set_mesh(self.mesh))
                stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
            return _forward(self.module, self.params, jnp.asarray(tokens, jnp.int32), **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _forward(module: ReflectiveModel, params: Any, tokens: jax.Array, **kwargs) -> ModelOutput:
    return module.apply({"params": params}, tokens, **kwargs)
