"""Measured model FLOPs utilisation of a preset's SFT step (forward, backward and AdamW) on this host's accelerators.

    python bench/mfu_bench.py qwen2_1.5b [key=value ...] [--batch 4] [--seq 9216] [--steps 5] [--peak-tflops T] [--json]

The step is the trainer's own (`make_sft_step`, the preset's dtype, remat, logits chunks and mesh over the local
devices), on random weights and random tokens. Model FLOPs are those of `python -m metastone_jax.aot`: 6 x the
matrix-multiplied parameters x tokens plus causal attention, forward and backward; remat's recomputation is not
counted, as MFU conventionally does not. The peak is the chip's dense bfloat16 rate from its data sheet (PEAK_TFLOPS
by device kind), or `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metastone_jax.aot_programs import attention_flops, causal_pairs, dense_flops
from metastone_jax.config_loading import ConfigError, load_config
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.sharding import make_mesh
from metastone_jax.step import make_sft_step
from metastone_jax.train_state import init_train_state, make_optimizer

# Dense bfloat16 TFLOP/s per chip, from the vendors' data sheets (SXM parts for NVIDIA).
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """The longest PEAK_TFLOPS key that starts device_kind ("NVIDIA H100 80GB HBM3" -> "NVIDIA H100")."""
    matches = [kind for kind in PEAK_TFLOPS if device_kind.startswith(kind)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def measure(preset: str, overrides: list[str], batch: int, seq: int, steps: int, peak: float | None) -> dict:
    config = load_config(preset, [*overrides, f"sft.batch_size={batch}", "sft.steps=1"])
    model = config.model
    architecture = model.qwen2_config()
    module = ReflectiveModel(
        architecture, True, jnp.dtype(model.dtype), jnp.dtype(model.param_dtype), model.remat, model.scan_layers
    )
    mesh = make_mesh(config.mesh)
    algorithm = config.comm.build()
    tx = make_optimizer(algorithm, optax.constant_schedule(1e-6), head_learning_rate=optax.constant_schedule(0.0))
    state = init_train_state(module, algorithm, tx, mesh, jax.random.key(0))
    step = make_sft_step(
        module, algorithm, tx, mesh, micro_batch_size=config.sft.micro_batch_size, logits_chunk=model.logits_chunk
    )
    rng = np.random.default_rng(0)
    data = {
        "tokens": rng.integers(0, architecture.vocab_size, (batch, seq), dtype=np.int32),
        "attention_mask": np.ones((batch, seq), bool),
        "loss_mask": np.ones((batch, seq), bool),
    }
    phase = algorithm.phase(0)
    started = time.perf_counter()
    state, metrics = step(state, data, phase=phase)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = step(state, data, phase=phase)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    tokens = batch * seq
    flops = 3 * dense_flops(architecture, tokens) + 3 * attention_flops(architecture, batch * causal_pairs(seq))
    devices = mesh.devices.size
    kind = jax.devices()[0].device_kind
    peak = peak or peak_tflops(kind)
    achieved = flops / step_s / devices / 1e12
    return {
        "preset": preset,
        "device": kind,
        "devices": devices,
        "batch": batch,
        "seq": seq,
        "dtype": model.dtype,
        "remat": model.remat,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_flops": flops,
        "tflops_per_chip": round(achieved, 1),
        "peak_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "loss": round(float(metrics["loss"]), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=9216, help="tokens per sequence (default 9216)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the compiling one (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: by device kind)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        result = measure(args.preset, args.overrides, args.batch, args.seq, args.steps, args.peak_tflops)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
