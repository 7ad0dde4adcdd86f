"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` is the replica axis the relaxed-communication algorithms run over (the slow links);
`fsdp` and `tensor` shard the model inside a replica group and are left to the compiler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metastone_jax.config import MESH_AXES, MeshConfig

# The replica axis of the relaxed-communication algorithms and of every train step's shard_map.
DATA_AXIS = MESH_AXES[0]

# Parameters use the plain names, activations the `act_` ones, so that one table can shard weights over
# `fsdp` (ZeRO-3 style) while activations shard their batch over `data` and `fsdp`.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all devices by default), with Auto axis types.

    Devices of several TPU slices (joined by DCN) are laid out with `data` across the slices and `fsdp`/`tensor`
    inside each, so that only the replica axis crosses the slow links.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = (config or MeshConfig()).shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    slices = slice_count(devices)
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if shape[0] % slices:
        raise ValueError(
            f"mesh data={shape[0]} does not split over the {slices} slices of the devices: the replica axis `data` "
            f"runs across slices, so make it a multiple of {slices}"
        )
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def slice_count(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices the devices span (1 for devices without a slice index, as on CPU and GPU)."""
    return len({getattr(device, "slice_index", 0) for device in devices})


def logical_rules(manual_axes: Sequence[str] = ()) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rules table without `manual_axes` (inside a shard_map manual over `data` the compiler owns the rest)."""

    def keep(target):
        if target is None or isinstance(target, str):
            return None if target in manual_axes else target
        kept = tuple(a for a in target if a not in manual_axes)
        return kept or None

    return tuple((name, keep(target)) for name, target in LOGICAL_RULES)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes dropped from every dimension of `shape` that they do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if names and dim % math.prod(mesh.shape[a] for a in names):
            names = ()
        fitted.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*fitted)


def to_device(tree, sharding: NamedSharding):
    """Host arrays (the same on every process) as global arrays in `sharding`; jax.Arrays pass through.

    On one process this is `jax.device_put`; with several, each process places its own shards, which jit needs
    (it refuses NumPy inputs with a sharding that spans other processes' devices).
    """

    def place(x):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array on this host, also where other processes hold parts of it."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
