"""The torch peer of bench/comms_bench.py: the same model, batch and AdamW under torch DDP, in full precision and with
torch's PowerSGD communication hook (rank 1 and 4), on 2 processes through the same launcher and emulated link.

    python bench/torch_peer_bench.py [--bandwidths 1gbit] [--latency 10ms] [--steps 8] [--json]
    python bench/torch_peer_bench.py --quality [--quality-steps 256] [--curves FILE] [--json]

`python bench/comms_bench.py --torch ...` runs it after each of its own launches and puts its rows in the same
table. DDP runs over gloo with one thread per process, all gradients in one bucket (with several buckets the
PowerSGD hook failed under gloo; the batched variant, `batch_tensors_with_same_shape`, fails in torch 2.13).
Wire bytes are what the hook hands to its all-reduces per step: 4 bytes per element, from the PowerSGD state's
compression statistics (the full gradient for DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.comms_bench import (  # noqa: E402
    BATCH,
    LEARNING_RATE,
    TARGET_NOISE,
    TEACHER_SCALE,
    WIDTH,
    label,
    launch,
    numpy_model,
    quality_inputs,
)

VARIANTS = [("torch_ddp", {}), ("torch_powersgd", {"rank": 1}), ("torch_powersgd", {"rank": 4})]
# As our powersgd in the quality runs: two full-precision steps first (torch's minimum with error feedback).
POWERSGD_START = 2


def torch_model(params: dict):
    """The residual MLP of comms_bench (h + gelu(h @ up + b) @ down + b per block) as a torch module."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.up, self.down = nn.Linear(*p["up"].shape), nn.Linear(*p["down"].shape)
            with torch.no_grad():
                for linear, name in ((self.up, "up"), (self.down, "down")):
                    linear.weight.copy_(torch.from_numpy(p[name].T.copy()))
                    linear.bias.copy_(torch.from_numpy(p[f"{name}_bias"]))

        def forward(self, h):
            # jax.nn.gelu's default is the tanh approximation.
            return h + self.down(nn.functional.gelu(self.up(h), approximate="tanh"))

    return nn.Sequential(*[Block(params[block]) for block in sorted(params)])


def build(name: str, options: dict, params: dict):
    """(DDP model, AdamW, PowerSGD state or None) for one variant."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    # One bucket for every gradient: 1 GB is more than the model's 100 MB.
    model = DistributedDataParallel(torch_model(params), bucket_cap_mb=1024)
    state = None
    if name == "torch_powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=options["rank"],
            start_powerSGD_iter=POWERSGD_START,
            min_compression_rate=2,
            use_error_feedback=True,
            warm_start=True,
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return model, optimizer, state


def train_step(model, optimizer, x, y) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def measure(name: str, options: dict, process_id: int, steps: int) -> dict:
    import torch

    model, optimizer, state = build(name, options, numpy_model(0))
    rng = np.random.default_rng(process_id)
    x, y = (torch.from_numpy(rng.normal(size=(BATCH, WIDTH)).astype(np.float32)) for _ in range(2))
    for _ in range(POWERSGD_START):
        train_step(model, optimizer, x, y)
    numel = sum(p.numel() for p in model.parameters())
    before = state.compression_stats()[2] if state else 0
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, x, y)
    step_s = (time.perf_counter() - start) / steps
    sent = (state.compression_stats()[2] - before) / steps if state else numel
    return {"wire_bytes_hlo": 4 * sent, "peak_wire_bytes_hlo": 4 * sent, "step_s": step_s}


def train_quality(name: str, options: dict, process_id: int, num_steps: int) -> dict:
    import torch
    import torch.distributed as dist

    teacher = torch_model(numpy_model(1, TEACHER_SCALE))
    model, optimizer, _ = build(name, options, numpy_model(0))

    def batch(step):
        x, noise = (torch.from_numpy(a) for a in quality_inputs(process_id, step))
        with torch.no_grad():
            return x, teacher(x) + TARGET_NOISE * noise

    curve = []
    for step in range(num_steps):
        loss = train_step(model, optimizer, *batch(step))
        dist.all_reduce(loss)
        curve.append(float(loss) / dist.get_world_size())
    x, y = batch(-1)
    with torch.no_grad():
        return {"loss": float(((model.module(x) - y) ** 2).mean()), "curve": curve}


def child(args) -> None:
    import torch
    import torch.distributed as dist

    from launch.local_cluster import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

    torch.set_num_threads(1)
    process_id = int(os.environ[PROCESS_ID_ENV])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{os.environ[COORDINATOR_ENV]}",
        rank=process_id,
        world_size=int(os.environ[NUM_PROCESSES_ENV]),
    )
    for name, options in VARIANTS:
        if args.quality:
            result = train_quality(name, options, process_id, args.quality_steps)
        else:
            result = measure(name, options, process_id, args.steps)
        if process_id == 0:
            print("RESULT " + json.dumps({"algorithm": label(name, options), **result}), flush=True)
    dist.destroy_process_group()


def run(link: list[str], args) -> list[dict]:
    """The variants' raw results ({algorithm, wire_bytes_hlo, peak_wire_bytes_hlo, step_s} or {algorithm, loss,
    curve}) from one launch over `link`."""
    mode = ["--quality", "--quality-steps", str(args.quality_steps)] if args.quality else ["--steps", str(args.steps)]
    return launch(link, mode, script="bench/torch_peer_bench.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", nargs="+", default=["1gbit"])
    parser.add_argument("--latency", help="one-way delay per packet on the emulated link, e.g. 10ms (default: none)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (after the full-precision ones)")
    parser.add_argument("--quality", action="store_true", help="train to compare losses instead of timing steps")
    parser.add_argument("--quality-steps", type=int, default=256)
    parser.add_argument("--curves", help="--quality: write every variant's loss per step to this JSON file")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quality:
        rows = run([], args)
        if args.curves:
            with open(args.curves, "w") as f:
                json.dump({r["algorithm"]: r.pop("curve") for r in rows}, f)
    else:
        rows = []
        for bandwidth in args.bandwidths:
            link = ["--bandwidth", bandwidth, *(["--latency", args.latency] if args.latency else [])]
            for row in run(link, args):
                rows.append({"bandwidth": bandwidth, "latency": args.latency or "0", **row})
    for row in rows:
        row.pop("curve", None)
        print(json.dumps(row) if args.json else " ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
