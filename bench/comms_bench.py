"""Communication benchmark: comms algorithms on 2 processes behind an emulated link, and the loss they train to.

    python bench/comms_bench.py [--bandwidths 1gbit 10gbit] [--latency 10ms] [--steps 8] [--algorithms 'diloco*']
    python bench/comms_bench.py --quality [--quality-steps 256] [--curves FILE.json] [--plot FILE.png] [--json]

Timing: starts `launch.local_cluster` (needs root for the shaped namespace) once per bandwidth, with the one-way
packet delay of --latency when given (iptables); each child trains a ~25M-parameter residual MLP data-parallel under
each algorithm and reports the bytes its compiled steps put on the wire (`comms.wire_bytes`) and its step time.
Algorithms whose steps differ (DiLoCo's inner steps and syncs) are compiled once per phase before timing, and timed
over whole periods. Printed per algorithm: wire bytes per step (averaged over a period) and their ratio to pmean,
the most bytes one step sends, step time, speedup over pmean, and the bound compute + pmean's communication time x
wire ratio.

Quality (--quality): the same model learns a teacher of its own architecture from fresh noisy examples (the same
stream under every algorithm, and under bench/torch_peer_bench.py) for --quality-steps steps on 2 processes, no
shaping (the loss does not depend on the link); reported: the loss of the final parameters on held-out examples
and its ratio to pmean's; --curves saves every algorithm's training loss per step.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HIDDEN, BLOCKS, BATCH = 1024, 4096, 3, 32
LEARNING_RATE = 3e-4
# The teacher's residual branches are TEACHER_SCALE x the student's initial ones; the targets carry this much noise.
TEACHER_SCALE, TARGET_NOISE, HELD_OUT = 4.0, 0.1, 256
DILOCO = [
    ("diloco", {"inner_steps": steps, "compression": compression, "fragments": fragments})
    for steps in (8, 32)
    for compression in ("none", "int8", "int4")
    for fragments in (1, 4)
]
ALGORITHMS = [
    ("pmean", {}),
    ("bytegrad", {}),
    ("onebit", {}),
    ("onebit_adam", {"warmup_steps": 1}),
    ("qadam", {"warmup_steps": 1}),
    ("decentralized", {"peer_mode": "all"}),
    ("decentralized", {"peer_mode": "shift_one"}),
    ("decentralized", {"peer_mode": "ring"}),
    ("low_precision_decentralized", {}),
    ("local_sgd", {"period": 4}),
    ("powersgd", {"rank": 1}),
    ("powersgd", {"rank": 4}),
    *DILOCO,
]
# The quality runs: pmean, the algorithms that compete on a slow link, and every DiLoCo row.
QUALITY_ALGORITHMS = [
    ("pmean", {}),
    ("onebit_adam", {"warmup_steps": 2}),
    ("powersgd", {"rank": 1, "start_step": 2}),
    ("powersgd", {"rank": 4, "start_step": 2}),
    *DILOCO,
]
# local_sgd with a period longer than the run never communicates: its step time is the compute-only time.
COMPUTE_ONLY = ("local_sgd", {"period": 1_000_000})


def label(name: str, options: dict) -> str:
    return name + "".join(f"[{key}={value}]" for key, value in options.items())


def numpy_model(seed: int, branch_scale: float = 1.0) -> dict:
    """BLOCKS x (WIDTH -> HIDDEN -> WIDTH) residual blocks, 25.2M parameters, as NumPy float32 arrays (the torch
    peer builds the same model from them). Each block computes h + gelu(h @ up + up_bias) @ down + down_bias."""
    rng = np.random.default_rng(seed)
    params = {}
    for block in range(BLOCKS):
        params[f"block{block}"] = {
            "up": rng.normal(size=(WIDTH, HIDDEN)) / WIDTH**0.5,
            "up_bias": np.zeros(HIDDEN),
            "down": rng.normal(size=(HIDDEN, WIDTH)) * branch_scale / HIDDEN**0.5 / BLOCKS,
            "down_bias": np.zeros(WIDTH),
        }
    return {block: {k: v.astype(np.float32) for k, v in p.items()} for block, p in params.items()}


def quality_inputs(process_id: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, noise), each [BATCH, WIDTH], of one process at one step; step -1 gives the held-out examples."""
    if step < 0:
        rng = np.random.default_rng([7, 0])
        return rng.normal(size=(2, HELD_OUT, WIDTH)).astype(np.float32)
    rng = np.random.default_rng([7, 1 + process_id, step])
    return rng.normal(size=(2, BATCH, WIDTH)).astype(np.float32)


def model_apply(params, x):
    import jax

    h = x
    for block in sorted(params):
        p = params[block]
        h = h + jax.nn.gelu(h @ p["up"] + p["up_bias"]) @ p["down"] + p["down_bias"]
    return h


def model_loss(params, x, y):
    import jax.numpy as jnp

    return jnp.mean((model_apply(params, x) - y) ** 2)


def schedule_period(name: str, options: dict) -> int:
    """Updates after which an algorithm's sequence of phases repeats (DiLoCo: H; others: 1)."""
    return options.get("inner_steps", 1)


class Trainer:
    """One algorithm's jitted steps on the mesh, compiled per phase as the train loop does."""

    def __init__(self, algorithm, mesh, example_batch):
        import jax
        from jax.sharding import PartitionSpec as P

        import comms

        self.algorithm, self.compiled = algorithm, {}
        self.tx = tx = algorithm.optimizer(LEARNING_RATE)
        spec = P(algorithm.axis_name)

        def init_states(params):
            local = comms.strip_replica_dim(params)
            return comms.add_replica_dim(tx.init(local)), comms.add_replica_dim(algorithm.init(local))

        def step_fn(params, opt_state, comm_state, batch, step, phase):
            params, opt_state, comm_state = map(comms.strip_replica_dim, (params, opt_state, comm_state))
            x, y = batch
            loss, grads = jax.value_and_grad(model_loss)(params, x[0], y[0])
            params, opt_state, comm_state = comms.apply_gradients(
                algorithm, tx, grads, params, opt_state, comm_state, step, phase
            )
            return (*map(comms.add_replica_dim, (params, opt_state, comm_state)), loss[None])

        self.init = jax.jit(jax.shard_map(init_states, mesh=mesh, in_specs=spec, out_specs=spec))
        self.step_fn, self.mesh, self.spec, self.example_batch = step_fn, mesh, spec, example_batch

    def compile(self, update: int, states) -> None:
        import jax
        from jax.sharding import PartitionSpec as P

        phase = self.algorithm.phase(update)
        if phase not in self.compiled:
            sharded = jax.shard_map(
                functools.partial(self.step_fn, phase=phase),
                mesh=self.mesh,
                in_specs=(self.spec,) * 4 + (P(),),
                out_specs=self.spec,
            )
            step = jax.jit(sharded, donate_argnums=(0, 1, 2))
            self.compiled[phase] = step.lower(*states, self.example_batch, jax.numpy.int32(update)).compile()

    def __call__(self, update: int, states, batch):
        import jax

        self.compile(update, states)
        return self.compiled[self.algorithm.phase(update)](*states, batch, jax.numpy.int32(update))

    def wire_bytes(self, update: int) -> int:
        import comms

        return comms.wire_bytes(self.compiled[self.algorithm.phase(update)])["total"]


def measure(name, options, mesh, params, batch, steps: int) -> dict:
    """Step time over whole periods after 2 warm-up steps; wire bytes per step (mean over a period) and at most."""
    import jax

    import comms

    trainer = Trainer(comms.get(name, **options), mesh, batch)
    params = jax.tree.map(lambda leaf: leaf.copy(), params)
    states = (params, *trainer.init(params))
    period = schedule_period(name, options)
    timed = range(2, 2 + math.ceil(steps / period) * period)
    for update in range(timed.stop):  # compile every phase first: compilation is not part of a step
        trainer.compile(update, states)
    for update in range(2):
        *states, loss = trainer(update, states, batch)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for update in timed:
        *states, loss = trainer(update, states, batch)
    jax.block_until_ready(loss)
    wire = [trainer.wire_bytes(update) for update in timed]
    return {
        "wire_bytes_hlo": sum(wire) / len(wire),
        "peak_wire_bytes_hlo": max(wire),
        "step_s": (time.perf_counter() - start) / len(timed),
    }


def train_quality(name, options, mesh, process_id: int, num_steps: int) -> dict:
    """Trains from the shared initial parameters on the teacher's stream; returns the mean training loss per step
    and the held-out loss of replica 0's final parameters (after a DiLoCo period's last step: the anchor)."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import comms

    fetch = functools.partial(multihost_utils.process_allgather, tiled=True)
    # Each process computes its own examples' targets on its own device.
    teacher = jax.device_put(numpy_model(1, TEACHER_SCALE), jax.local_devices()[0])
    targets = jax.jit(lambda x, noise: model_apply(teacher, x) + TARGET_NOISE * noise)
    per_replica = NamedSharding(mesh, P("data"))

    def local_batch(update):
        x, noise = quality_inputs(process_id, update)
        y = np.asarray(targets(x, noise))
        return tuple(jax.make_array_from_process_local_data(per_replica, a[None]) for a in (x, y))

    params = jax.device_put(comms.replicate(numpy_model(0), mesh.shape["data"]), per_replica)
    trainer = Trainer(comms.get(name, **options), mesh, local_batch(0))
    states, curve = (params, *trainer.init(params)), []
    for update in range(num_steps):
        *states, loss = trainer(update, states, local_batch(update))
        curve.append(float(fetch(loss).mean()))
    held_out_x, held_out_noise = quality_inputs(0, -1)
    held_out = tuple(
        jax.make_array_from_process_local_data(per_replica, a[None])
        for a in (held_out_x, targets(held_out_x, held_out_noise))
    )
    evaluate = jax.jit(
        jax.shard_map(
            lambda p, x, y: model_loss(comms.strip_replica_dim(p), x[0], y[0])[None],
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
        )
    )
    return {"loss": float(fetch(evaluate(states[0], *held_out))[0]), "curve": curve}


def child(args) -> None:
    """One process of the launch: measures (or trains) every algorithm, rank 0 prints one RESULT line each."""
    from metastone_jax.distributed import initialize_from_env

    process_id, num_processes = initialize_from_env()
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import comms

    mesh = jax.make_mesh((num_processes,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for name, options in selected(QUALITY_ALGORITHMS if args.quality else [COMPUTE_ONLY, *ALGORITHMS], args):
        if args.quality:
            result = train_quality(name, options, mesh, process_id, args.quality_steps)
        else:
            params = jax.device_put(comms.replicate(numpy_model(0), num_processes), NamedSharding(mesh, P("data")))
            rng = np.random.default_rng(process_id)
            local = lambda a: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), a)  # noqa: E731
            batch = tuple(local(rng.normal(size=(1, BATCH, WIDTH)).astype(np.float32)) for _ in range(2))
            result = measure(name, options, mesh, params, batch, args.steps)
        if process_id == 0:
            print("RESULT " + json.dumps({"algorithm": label(name, options), **result}), flush=True)


def selected(algorithms: list, args) -> list:
    """The algorithms whose labels match --algorithms (pmean and the compute-only run always, as the baselines)."""
    if not args.algorithms:
        return algorithms
    always = {label(*COMPUTE_ONLY), "pmean"}
    return [
        (name, options)
        for name, options in algorithms
        if label(name, options) in always
        or any(fnmatch.fnmatchcase(label(name, options), pattern) for pattern in args.algorithms)
    ]


def per_step_wire_bytes(name: str, options: dict, hlo_bytes: float) -> float:
    """Bytes one steady-state step sends. The HLO of local_sgd holds its averaging all-reduce in a conditional
    that runs every `period` steps (algorithms with phases are counted per phase by `measure`)."""
    if name == "local_sgd":
        return hlo_bytes / options["period"]
    return hlo_bytes


def launch(link: list[str], child_args: list[str], script: str = "bench/comms_bench.py") -> list[dict]:
    """Runs `script --child child_args` on 2 processes over `link`; returns the RESULT lines of rank 0."""
    command = [
        sys.executable, "-m", "launch.local_cluster", "--num-processes", "2", *link,
        "--", script, "--child", *child_args,
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    launched = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if launched.returncode:
        raise SystemExit(f"the launch {link} failed:\n{launched.stdout[-4000:]}\n{launched.stderr[-4000:]}")
    return [json.loads(line.split("RESULT ", 1)[1]) for line in launched.stdout.splitlines() if "RESULT " in line]


def child_args(args) -> list[str]:
    patterns = ["--algorithms", *args.algorithms] if args.algorithms else []
    return ["--steps", str(args.steps), "--quality-steps", str(args.quality_steps), *patterns] + (
        ["--quality"] if args.quality else []
    )


def torch_rows(link: list[str], args) -> list[dict]:
    """bench/torch_peer_bench.py's rows over the same link (with --torch), else none."""
    if not args.torch:
        return []
    from bench import torch_peer_bench

    return torch_peer_bench.run(link, args)


def run_bandwidth(bandwidth: str, latency: str | None, args) -> list[dict]:
    link = ["--bandwidth", bandwidth, *(["--latency", latency] if latency else [])]
    by_label = {row["algorithm"]: row for row in launch(link, child_args(args))}
    peers = torch_rows(link, args)
    by_label.update({row["algorithm"]: row for row in peers})
    compute_s = by_label[label(*COMPUTE_ONLY)]["step_s"]
    pmean = by_label["pmean"]
    pmean_comm_s = max(pmean["step_s"] - compute_s, 0.0)
    rows = []
    for name, options in [*selected(ALGORITHMS, args), *((row["algorithm"], {}) for row in peers)]:
        row = by_label[label(name, options)]
        wire = per_step_wire_bytes(name, options, row["wire_bytes_hlo"])
        ratio = wire / pmean["wire_bytes_hlo"]
        bound_s = compute_s + pmean_comm_s * ratio
        rows.append({
            "algorithm": row["algorithm"], "bandwidth": bandwidth, "latency": latency or "0", "wire_bytes": int(wire),
            "wire_bytes_hlo": row["wire_bytes_hlo"], "peak_wire_bytes": int(row["peak_wire_bytes_hlo"]),
            "wire_ratio": ratio, "step_s": row["step_s"], "speedup": pmean["step_s"] / row["step_s"],
            "compute_s": compute_s, "bound_s": bound_s, "bound_speedup": pmean["step_s"] / bound_s,
        })  # fmt: skip
    return rows


def plot_curves(curves: dict[str, list[float]], path: str) -> None:
    """Training loss per step of every algorithm (smoothed over 8 steps) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for name, curve in sorted(curves.items()):
        smooth = np.convolve(curve, np.ones(8) / 8, mode="valid")
        axes.plot(np.arange(len(smooth)) + 8, smooth, label=name, linewidth=1.2 if name.startswith("torch") else 1.6)
    axes.set(xlabel="step (2 replicas x 32 examples)", ylabel="training loss (mean of 8 steps)", yscale="log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_quality(args) -> list[dict]:
    results = launch([], child_args(args)) + torch_rows([], args)
    pmean_loss = next(r["loss"] for r in results if r["algorithm"] == "pmean")
    curves = {r["algorithm"]: r["curve"] for r in results}
    if args.curves:
        with open(args.curves, "w") as f:
            json.dump(curves, f)
    if args.plot:
        plot_curves(curves, args.plot)
    return [
        {
            "algorithm": r["algorithm"],
            "steps": args.quality_steps,
            "loss": r["loss"],
            "loss_ratio": r["loss"] / pmean_loss,
        }
        for r in results
    ]


def print_table(rows: list[dict]) -> None:
    if "loss" in rows[0]:
        print("| algorithm | steps | loss | loss / pmean's |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['algorithm']} | {r['steps']} | {r['loss']:.4f} | {r['loss_ratio']:.3f} |")
        return
    header = ["bandwidth", "latency", "algorithm", "wire MB/step", "peak MB", "ratio", "step s", "speedup", "bound s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            r["bandwidth"], r["latency"], r["algorithm"], f"{r['wire_bytes'] / 1e6:.3f}",
            f"{r['peak_wire_bytes'] / 1e6:.2f}", f"{r['wire_ratio']:.4f}", f"{r['step_s']:.3f}",
            f"{r['speedup']:.2f}x", f"{r['bound_s']:.3f}",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--latency", help="one-way delay per packet on the emulated link, e.g. 10ms (default: none)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per algorithm, rounded up to whole periods")
    parser.add_argument("--algorithms", nargs="+", help="label patterns (fnmatch), e.g. 'diloco*'; pmean always runs")
    parser.add_argument("--quality", action="store_true", help="train to compare losses instead of timing steps")
    parser.add_argument("--quality-steps", type=int, default=256, help="training steps per algorithm in --quality")
    parser.add_argument("--curves", help="--quality: write every algorithm's loss per step to this JSON file")
    parser.add_argument("--plot", help="--quality: plot every algorithm's loss per step into this PNG")
    parser.add_argument("--torch", action="store_true", help="add bench/torch_peer_bench.py's rows (DDP, PowerSGD)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quality:
        rows = run_quality(args)
    else:
        rows = [row for bandwidth in args.bandwidths for row in run_bandwidth(bandwidth, args.latency, args)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
