"""Communication benchmark: every comms algorithm on 2 processes behind an emulated 1 and 10 Gbit/s link.

    python bench/comms_bench.py [--bandwidths 1gbit 10gbit] [--latency 5ms] [--steps 3] [--json]

Starts `launch.local_cluster` (needs root for the shaped namespace) once per bandwidth, with the one-way packet
delay of --latency when given (iptables); each child trains a
~25M-parameter residual MLP data-parallel under each algorithm and reports the bytes its compiled step puts on
the wire (`comms.wire_bytes`) and its step time. Printed per algorithm: wire bytes and their ratio to pmean,
step time, speedup over pmean, and the bound compute + pmean's communication time * wire ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HIDDEN, BLOCKS, BATCH = 1024, 4096, 3, 32
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
]
# local_sgd with a period longer than the run never communicates: its step time is the compute-only time.
COMPUTE_ONLY = ("local_sgd", {"period": 1_000_000})


def label(name: str, options: dict) -> str:
    return name + "".join(f"[{key}={value}]" for key, value in options.items())


def init_model(key):
    """A residual MLP stack: BLOCKS x (WIDTH -> HIDDEN -> WIDTH), 25.2M parameters."""
    import jax
    import jax.numpy as jnp

    params = {}
    for block in range(BLOCKS):
        key, up, down = jax.random.split(key, 3)
        params[f"block{block}"] = {
            "up": jax.random.normal(up, (WIDTH, HIDDEN)) / WIDTH**0.5,
            "up_bias": jnp.zeros((HIDDEN,)),
            "down": jax.random.normal(down, (HIDDEN, WIDTH)) / HIDDEN**0.5 / BLOCKS,
            "down_bias": jnp.zeros((WIDTH,)),
        }
    return params


def model_loss(params, x, y):
    import jax
    import jax.numpy as jnp

    h = x
    for block in sorted(params):
        p = params[block]
        h = h + jax.nn.gelu(h @ p["up"] + p["up_bias"]) @ p["down"] + p["down_bias"]
    return jnp.mean((h - y) ** 2)


def measure(algorithm, mesh, params, x, y, steps: int) -> dict:
    """Compiles one train step under `algorithm`; returns its wire bytes and mean step time after warm-up."""
    import jax
    from jax.sharding import PartitionSpec as P

    import comms

    tx = algorithm.optimizer(1e-4)
    spec = P(algorithm.axis_name)

    def init_states(params):
        local = comms.strip_replica_dim(params)
        return comms.add_replica_dim(tx.init(local)), comms.add_replica_dim(algorithm.init(local))

    def step_fn(params, opt_state, comm_state, x, y, step, phase):
        params, opt_state, comm_state = map(comms.strip_replica_dim, (params, opt_state, comm_state))
        loss, grads = jax.value_and_grad(model_loss)(params, x[0], y[0])
        params, opt_state, comm_state = comms.apply_gradients(
            algorithm, tx, grads, params, opt_state, comm_state, step, phase
        )
        return (*map(comms.add_replica_dim, (params, opt_state, comm_state)), loss[None])

    init_fn = jax.jit(jax.shard_map(init_states, mesh=mesh, in_specs=spec, out_specs=spec))
    params = jax.tree.map(lambda leaf: leaf.copy(), params)
    opt_state, comm_state = init_fn(params)
    compiled = {}  # one program per optimizer phase (1-bit Adam: warm-up, compressed), as the train loop does

    def run_step(i, params, opt_state, comm_state):
        phase = algorithm.phase(i)
        if phase not in compiled:
            sharded = jax.shard_map(
                functools.partial(step_fn, phase=phase), mesh=mesh, in_specs=(spec,) * 5 + (P(),), out_specs=spec
            )
            step = jax.jit(sharded, donate_argnums=(0, 1, 2))
            compiled[phase] = step.lower(params, opt_state, comm_state, x, y, jax.numpy.int32(i)).compile()
        return compiled[phase](params, opt_state, comm_state, x, y, jax.numpy.int32(i))

    # Two warm-up steps: past the compressed-Adam warm-up, and past any first-call cost.
    for i in range(2):
        params, opt_state, comm_state, loss = run_step(i, params, opt_state, comm_state)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(2, 2 + steps):
        params, opt_state, comm_state, loss = run_step(i, params, opt_state, comm_state)
    jax.block_until_ready(loss)
    step_s = (time.perf_counter() - start) / steps
    return {"wire_bytes_hlo": comms.wire_bytes(compiled[algorithm.phase(2)])["total"], "step_s": step_s}


def child(steps: int) -> None:
    """One process of the launch: measures every algorithm, rank 0 prints one RESULT line each."""
    from metastone_jax.distributed import initialize_from_env

    process_id, num_processes = initialize_from_env()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import comms

    mesh = jax.make_mesh((num_processes,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.device_put(
        comms.replicate(init_model(jax.random.key(0)), num_processes), NamedSharding(mesh, P("data"))
    )
    rng = np.random.default_rng(process_id)
    local = lambda a: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), a)  # noqa: E731
    x = local(rng.normal(size=(1, BATCH, WIDTH)).astype(np.float32))
    y = local(rng.normal(size=(1, BATCH, WIDTH)).astype(np.float32))
    for name, options in [COMPUTE_ONLY, *ALGORITHMS]:
        result = measure(comms.get(name, **options), mesh, params, x, y, steps)
        if process_id == 0:
            print("RESULT " + json.dumps({"algorithm": label(name, options), **result}), flush=True)


def per_step_wire_bytes(name: str, options: dict, hlo_bytes: int) -> float:
    """Bytes one steady-state step sends. The HLO of local_sgd holds its averaging all-reduce in a conditional
    that runs every `period` steps (1-bit Adam / QAdam are measured on their compressed-phase program)."""
    if name == "local_sgd":
        return hlo_bytes / options["period"]
    return hlo_bytes


def run_bandwidth(bandwidth: str, latency: str | None, steps: int) -> list[dict]:
    link = ["--bandwidth", bandwidth, *(["--latency", latency] if latency else [])]
    command = [
        sys.executable, "-m", "launch.local_cluster", "--num-processes", "2", *link,
        "--", "bench/comms_bench.py", "--child", "--steps", str(steps),
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    launched = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if launched.returncode:
        raise SystemExit(f"the {bandwidth} launch failed:\n{launched.stdout[-4000:]}\n{launched.stderr[-4000:]}")
    raw = [json.loads(line.split("RESULT ", 1)[1]) for line in launched.stdout.splitlines() if "RESULT " in line]
    by_label = {row["algorithm"]: row for row in raw}
    compute_s = by_label[label(*COMPUTE_ONLY)]["step_s"]
    pmean = by_label["pmean"]
    pmean_comm_s = max(pmean["step_s"] - compute_s, 0.0)
    rows = []
    for name, options in ALGORITHMS:
        row = by_label[label(name, options)]
        wire = per_step_wire_bytes(name, options, row["wire_bytes_hlo"])
        ratio = wire / pmean["wire_bytes_hlo"]
        bound_s = compute_s + pmean_comm_s * ratio
        rows.append({
            "algorithm": row["algorithm"], "bandwidth": bandwidth, "latency": latency or "0", "wire_bytes": int(wire),
            "wire_bytes_hlo": row["wire_bytes_hlo"], "wire_ratio": ratio, "step_s": row["step_s"],
            "speedup": pmean["step_s"] / row["step_s"], "compute_s": compute_s, "bound_s": bound_s,
            "bound_speedup": pmean["step_s"] / bound_s,
        })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    header = [
        "bandwidth",
        "latency",
        "algorithm",
        "wire MB/step",
        "ratio",
        "step s",
        "speedup",
        "bound s",
        "bound speedup",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            r["bandwidth"], r["latency"], r["algorithm"], f"{r['wire_bytes'] / 1e6:.2f}", f"{r['wire_ratio']:.3f}",
            f"{r['step_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['bound_s']:.3f}", f"{r['bound_speedup']:.2f}x",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--latency", help="one-way delay per packet on the emulated link, e.g. 5ms (default: none)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per algorithm (after 2 warm-up steps)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return
    rows = [row for bandwidth in args.bandwidths for row in run_bandwidth(bandwidth, args.latency, args.steps)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
