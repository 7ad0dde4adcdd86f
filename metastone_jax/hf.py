"""Hugging Face import/export: Qwen2ForCausalLM safetensors (+ the SPRM's `score_module.pt`) <-> our parameters.

Loading reads tensor by tensor and, through `jax.make_array_from_callback`, each device's shard by slice from
memory-mapped files, straight into the target sharding: no host ever holds the whole model. Everything (config,
tensor names, shapes) is checked before any weight is read, so a bad directory fails before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import traverse_util

from metastone_jax.config import MeshConfig, Qwen2Config
from metastone_jax.models.reflective import HEAD, Model, ReflectiveModel, abstract_params, param_shardings
from metastone_jax.safetensors_io import SafetensorsFiles, save_file
from metastone_jax.sharding import make_mesh, to_host
from metastone_jax.torch_io import load_state_dict, save_state_dict

HEAD_FILES = ("score_module.pt", "score_module.safetensors")
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


def read_config(path: str | Path) -> Qwen2Config:
    """A Hugging Face Qwen2 config.json, refusing what this implementation would silently get wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type != "qwen2":
        raise ValueError(f"{path}: model_type={model_type!r} is not supported; only 'qwen2' is")
    architectures = raw.get("architectures") or list(SUPPORTED_ARCHITECTURES)
    unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise ValueError(f"{path}: architecture {unsupported[0]!r} is not supported; only Qwen2ForCausalLM is")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{path}: rope scaling {rope_type!r} is not supported; only default rotary embeddings are")
    if raw.get("use_sliding_window", False):
        raise ValueError(f"{path}: use_sliding_window=true is not supported; only full attention is")
    layer_types = set(raw.get("layer_types") or []) - {"full_attention"}
    if layer_types:
        raise ValueError(f"{path}: layer_types other than 'full_attention' are not supported: {sorted(layer_types)}")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
        raise ValueError(f"{path}: head_dim={head_dim} != hidden_size / num_attention_heads is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing required field(s) {', '.join(missing)}")
    kwargs = {k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(Qwen2Config)}}
    kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
    if "rope_theta" not in raw and "rope_theta" in rope:
        kwargs["rope_theta"] = rope["rope_theta"]
    try:
        return Qwen2Config(**kwargs)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        field = ".".join(map(str, error["loc"]))
        where = f"{field}={error['input']!r}" if field else "config"
        raise ValueError(f"{path}: {where}: {error['msg'].removeprefix('Value error, ')}") from None


def config_json(config: Qwen2Config, torch_dtype: str = "float32") -> dict[str, Any]:
    """The config.json that transformers and vLLM load as Qwen2ForCausalLM."""
    return {
        **dataclasses.asdict(config),
        "architectures": list(SUPPORTED_ARCHITECTURES),
        "model_type": "qwen2",
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def _entries(config: Qwen2Config, with_head: bool) -> list[tuple[str, str, str, tuple[int, int] | None]]:
    """How each HF tensor maps onto one of our (per-layer) parameters: (our path, HF name with {i} for the layer,
    layout: copy / transpose / out_heads / bias_heads / in_heads, and (num_heads, head_dim) where the HF tensor
    folds the heads into one axis, else None)."""
    q = (config.num_attention_heads, config.head_dim)
    kv = (config.num_key_value_heads, config.head_dim)
    layer = "model.layers.{i}."
    entries = [
        ("model/embed_tokens/embedding", "model.embed_tokens.weight", "copy", None),
        ("model/norm/scale", "model.norm.weight", "copy", None),
    ]
    for proj, heads in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        entries.append((f"model/layers/self_attn/{proj}/kernel", f"{layer}self_attn.{proj}.weight", "out_heads", heads))
        entries.append((f"model/layers/self_attn/{proj}/bias", f"{layer}self_attn.{proj}.bias", "bias_heads", heads))
    entries.append(("model/layers/self_attn/o_proj/kernel", f"{layer}self_attn.o_proj.weight", "in_heads", q))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        entries.append((f"model/layers/mlp/{proj}/kernel", f"{layer}mlp.{proj}.weight", "transpose", None))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        entries.append((f"model/layers/{norm}/scale", f"{layer}{norm}.weight", "copy", None))
    if not config.tie_word_embeddings:
        entries.append(("lm_head/kernel", "lm_head.weight", "transpose", None))
    if with_head:
        entries += [
            (f"{HEAD}/hidden/kernel", "0.weight", "transpose", None),
            (f"{HEAD}/hidden/bias", "0.bias", "copy", None),
            (f"{HEAD}/out/kernel", "3.weight", "transpose", None),
            (f"{HEAD}/out/bias", "3.bias", "copy", None),
        ]
    return entries


def _hf_shape(layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one layer of our parameter shape `ours`."""
    if layout == "copy":
        return ours
    if layout == "transpose":
        return ours[::-1]
    if layout == "out_heads":  # ours [embed, heads, head_dim] <- HF [heads*head_dim, embed]
        return (ours[1] * ours[2], ours[0])
    if layout == "bias_heads":  # ours [heads, head_dim] <- HF [heads*head_dim]
        return (ours[0] * ours[1],)
    return (ours[2], ours[0] * ours[1])  # in_heads: ours [heads, head_dim, embed] <- HF [embed, heads*head_dim]


def _read_layer(read: Callable, layout: str, heads, index: tuple[slice, ...]) -> np.ndarray:
    """One layer's block `index` of our parameter, read from the HF tensor by the matching HF slice."""
    if layout == "copy":
        return read(index)
    if layout == "transpose":
        return read(index[::-1]).T
    head_dim = heads[1]
    if layout == "out_heads":
        embed, h, d = index
        block = read((slice(h.start * head_dim, h.stop * head_dim), embed))
        return block.reshape(h.stop - h.start, head_dim, -1).transpose(2, 0, 1)[:, :, d]
    if layout == "bias_heads":
        h, d = index
        return read((slice(h.start * head_dim, h.stop * head_dim),)).reshape(-1, head_dim)[:, d]
    h, d, embed = index  # in_heads
    block = read((embed, slice(h.start * head_dim, h.stop * head_dim)))
    return block.T.reshape(h.stop - h.start, head_dim, -1)[:, d, :]


def _write_layer(value: np.ndarray, layout: str) -> np.ndarray:
    """Our one-layer parameter -> the HF tensor (the inverse of `_read_layer` on the full block)."""
    if layout == "copy":
        return value
    if layout == "transpose":
        return value.T
    if layout == "out_heads":
        return value.transpose(1, 2, 0).reshape(-1, value.shape[0])
    if layout == "bias_heads":
        return value.reshape(-1)
    return value.reshape(-1, value.shape[-1]).T  # in_heads


class _HeadTensors:
    """The SPRM head's four tensors, read whole (they are tiny) from score_module.pt (without torch) or
    .safetensors."""

    def __init__(self, path: Path):
        if path.suffix == ".safetensors":
            files = SafetensorsFiles([path])
            self.tensors = {name: files.read(name) for name in files.names()}
            return
        self.tensors = {name: t.astype(np.float32) for name, t in load_state_dict(path).items()}

    def __contains__(self, name):
        return name in self.tensors

    def shape(self, name):
        return self.tensors[name].shape

    def read(self, name, index=()):
        return self.tensors[name][index]


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ValueError(f"{index}: not a safetensors index (no 'weight_map')") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json with its shards"
    )


def load_hf(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = jnp.float32,
    with_head: bool | None = None,
    scan_layers: bool = True,
) -> Model:
    """Loads a local Hugging Face Qwen2 directory (and its SPRM head when present) into the sharding of `mesh`.

    `with_head=None` loads the head if `score_module.pt`/`.safetensors` is there; True requires it; False skips it.
    `scan_layers=False` unrolls the layer stack (same parameters): faster on CPU, slower to compile for deep models.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = read_config(path / "config.json")
    weights = SafetensorsFiles(_weight_files(path))
    head_path = next((path / f for f in HEAD_FILES if (path / f).is_file()), None)
    if with_head and head_path is None:
        raise FileNotFoundError(f"no SPRM head in {path}: expected one of {', '.join(HEAD_FILES)}")
    with_head = head_path is not None if with_head is None else with_head
    head = _HeadTensors(head_path) if with_head else None

    module = ReflectiveModel(config, with_head=with_head, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    if mesh is None:
        mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    shardings = traverse_util.flatten_dict(param_shardings(module, mesh), sep="/")
    shapes = {k: v.value.shape for k, v in traverse_util.flatten_dict(abstract_params(module), sep="/").items()}

    # Check every tensor before reading any.
    plan = []
    for ours, hf_name, layout, heads in _entries(config, with_head):
        source = head if ours.startswith(f"{HEAD}/") else weights
        layered = "/layers/" in ours
        names = [hf_name.format(i=i) for i in range(config.num_hidden_layers)] if layered else [hf_name]
        expected = _hf_shape(layout, shapes[ours][1:] if layered else shapes[ours])
        where = head_path if source is head else path
        for name in names:
            if name not in source:
                raise ValueError(f"{where}: tensor {name!r} is missing")
            if tuple(source.shape(name)) != tuple(expected):
                shape = tuple(source.shape(name))
                raise ValueError(f"{where}: tensor {name!r} has shape {shape} but the config needs {tuple(expected)}")
        plan.append((ours, source, names, layout, heads, layered))
    used = {name for entry in plan for name in entry[2]}
    unused = [n for n in weights.names() if n not in used and not n.endswith("rotary_emb.inv_freq")]
    if unused and not (config.tie_word_embeddings and unused == ["lm_head.weight"]):
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by Qwen2ForCausalLM, e.g. {unused[:3]}", stacklevel=2)

    def load(ours, source, names, layout, heads, layered):
        shape = shapes[ours]
        np_dtype = jnp.dtype(dtype)

        def block(index):
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
            if not layered:
                return _read_layer(lambda i: source.read(names[0], i), layout, heads, index).astype(np_dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack(
                [_read_layer(lambda i, n=names[layer]: source.read(n, i), layout, heads, index[1:]) for layer in layers]
            ).astype(np_dtype)

        return jax.make_array_from_callback(shape, shardings[ours], block, dtype=np_dtype)

    params = {entry[0]: load(*entry) for entry in plan}
    return Model(module, traverse_util.unflatten_dict(params, sep="/"), mesh)


def _export_plan(model: Model) -> list[tuple[str, str, int | None, str]]:
    """(HF name, our path, layer index or None, layout) for every tensor of the export."""
    config = model.module.config
    plan = []
    for ours, hf_name, layout, _ in _entries(config, model.module.with_head):
        if "/layers/" in ours:
            plan += [(hf_name.format(i=i), ours, i, layout) for i in range(config.num_hidden_layers)]
        else:
            plan.append((hf_name, ours, None, layout))
    return plan


def save_hf(model: Model, path: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
    """Writes `model` as a directory that transformers / vLLM load (config.json + safetensors), plus the head.

    One tensor (one layer's slice) at a time reaches the host. Shards of at most `max_shard_bytes` with
    `model.safetensors.index.json` when the model needs more than one. The head goes to `score_module.pt` (the
    released format, written without torch).
    """
    path = Path(path)
    is_writer = jax.process_index() == 0
    flat = traverse_util.flatten_dict(model.params, sep="/")
    plan = _export_plan(model)
    body = [entry for entry in plan if not entry[1].startswith(f"{HEAD}/")]

    def nbytes(entry):
        array = flat[entry[1]]
        return array.nbytes // array.shape[0] if entry[2] is not None else array.nbytes

    shards: list[list[tuple]] = [[]]
    shard_bytes = 0
    for entry in body:
        if shard_bytes and shard_bytes + nbytes(entry) > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes(entry)

    def tensors(entries):
        out = {}
        for hf_name, ours, layer, layout in entries:
            value = flat[ours] if layer is None else flat[ours][layer]
            out[hf_name] = _write_layer(to_host(value), layout)
        return out

    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    if is_writer:
        path.mkdir(parents=True, exist_ok=True)
        config = config_json(model.module.config, torch_dtype=jnp.dtype(model.module.param_dtype).name)
        (path / "config.json").write_text(json.dumps(config, indent=2))
    for file, entries in zip(files, shards):
        shard = tensors(entries)  # every process takes part in gathering non-addressable arrays
        if is_writer:
            save_file(shard, path / file)
    if is_writer and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(e) for e in body)},
            "weight_map": {entry[0]: file for file, entries in zip(files, shards) for entry in entries},
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    head = tensors([entry for entry in plan if entry[1].startswith(f"{HEAD}/")])
    if is_writer and head:
        save_state_dict({name: t.astype(np.float32) for name, t in head.items()}, path / "score_module.pt")
