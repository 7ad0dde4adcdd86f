"""metastone_jax: reflective reasoning models (Qwen2 policy + SPRM head) in JAX, with relaxed communication."""

from metastone_jax.config import MeshConfig, Qwen2Config
from metastone_jax.hf import load_hf, save_hf
from metastone_jax.models.reflective import Model, ModelOutput, ReflectiveModel, init_params
from metastone_jax.sharding import make_mesh

__all__ = [
    "MeshConfig",
    "Model",
    "ModelOutput",
    "Qwen2Config",
    "ReflectiveModel",
    "init_params",
    "load_hf",
    "make_mesh",
    "save_hf",
]
