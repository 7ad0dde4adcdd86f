"""`python -m metastone_jax.aot PRESET [key=value ...] --topology v5p-16 [--slices N] [--json]`: will a run fit a TPU?

Compiles the run's own programs (the SFT step, the RL step with its reference forward and communication algorithm,
the rollout sampler: prefill + decode loop with its KV cache) for abstract TPU devices of a topology, with the TPU
compiler of libtpu on any host (`pip install -e '.[tpu]'`), and reports per chip: memory (parameters, optimizer,
communication state, temporaries; the peak against the chip's HBM), FLOPs (the model's count against XLA's), XLA's
roofline time and the MFU it implies, and the bytes each collective moves per mesh axis (ICI inside a slice, DCN
across slices). Times and MFU are the compiler's estimate, not a measurement.

XLA's cost analysis counts the body of a loop once, so FLOPs, time and collective bytes come from the same programs
without loops: 2 and 3 layers unrolled, extrapolated linearly to the model's depth, and a train step's micro-batches
and logits chunks unrolled at 2 and 3 micro-batches, extrapolated to their number; the sampler's decode loop stays one
step (its length depends on the samples). Memory comes from the programs exactly as the run compiles them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np

import comms
from metastone_jax.aot_programs import Program, build_programs
from metastone_jax.config import CommConfig, RunConfig
from metastone_jax.config_loading import ConfigError, load_config
from metastone_jax.sharding import make_mesh, slice_count

# Chips per slice of each v5p size (v5p-N has N TensorCores, 2 per chip) and the slice's physical shape.
V5P_SHAPES = {
    8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8", 1024: "8x8x8",
    2048: "8x8x16", 4096: "8x16x16", 8192: "16x16x16",
}  # fmt: skip
V5P_HBM_BYTES = int(95.74 * 2**30)  # what the compiler reports as available per chip
V5P_PEAK_FLOPS = 459e12  # bfloat16 per chip


class AotError(Exception):
    """A bad topology, mesh or installation, told in one sentence."""


def topology_name(topology: str) -> str:
    """'v5p-16' (cores, as Cloud TPU names slices) or 'v5p:2x2x2' (chips) -> the compiler's 'v5p:2x2x2'."""
    if topology.startswith("v5p:"):
        if topology.removeprefix("v5p:") in V5P_SHAPES.values():
            return topology
    elif topology.startswith("v5p-") and topology[4:].isdigit() and int(topology[4:]) in V5P_SHAPES:
        return f"v5p:{V5P_SHAPES[int(topology[4:])]}"
    sizes = ", ".join(f"v5p-{n}" for n in V5P_SHAPES)
    raise AotError(f"unknown topology {topology!r}; choose one of {sizes} (or v5p:AxBxC with one of those shapes)")


def tpu_devices(topology: str, slices: int) -> list:
    """Abstract devices of `slices` slices of `topology`: they compile, they do not run."""
    name = topology_name(topology)
    if slices < 1:
        raise AotError(f"--slices={slices} must be at least 1")
    if importlib.util.find_spec("libtpu") is None:
        raise AotError("libtpu is not installed, and compiling for TPU needs its compiler: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    # The devices only compile: they may share libtpu with another process (a training run on this TPU VM).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": slices} if slices > 1 else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices


@dataclasses.dataclass
class Report:
    """One program: bytes per chip; FLOPs, time and collective bytes per step (FLOPs of all chips together)."""

    preset: str
    topology: str
    program: str
    phase: str | None  # the communication algorithm's phase compiled
    mesh: dict[str, int]
    chips: int
    bytes_per_chip: int  # peak: arguments + outputs + temporaries - aliased
    hbm_per_chip: int
    fits: bool
    headroom: float  # fraction of HBM left
    memory: dict[str, int]  # per chip: parameters, optimizer, comm_state, reference, batch, temporaries, ...
    model_flops: float
    xla_flops: float  # XLA's count: without the Pallas attention kernels, which it cannot see into
    optimal_seconds: float | None  # XLA's roofline + the kernels' FLOPs at peak; None where XLA gives none
    mfu_estimate: float | None
    collective_bytes: dict[str, dict[str, int]]  # {"ici": {axes: bytes}, "dcn": {axis: bytes}}, per chip


def analyse(program: Program, cost: dict, mesh, preset: str, topology: str) -> Report:
    stats = program.compiled.memory_analysis()
    temporaries = program.required_temporaries or stats.temp_size_in_bytes
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + temporaries
    memory = {
        **program.argument_bytes,
        "temporaries": temporaries,
        "outputs_not_aliased": stats.output_size_in_bytes - stats.alias_size_in_bytes,
    }
    chips, seconds = mesh.devices.size, cost["optimal_seconds"]
    if seconds is not None:
        seconds += program.kernel_flops / (chips * V5P_PEAK_FLOPS)
    links: dict[str, dict[str, int]] = {"ici": {}, "dcn": {}}
    for axes, size in cost["collective_bytes"].items():
        link, axes = ("dcn", "+".join(_axes_across_slices(mesh))) if axes == "slices" else ("ici", axes)
        links[link][axes] = int(size)
    return Report(
        preset=preset,
        topology=topology,
        program=program.name,
        phase=None if program.phase is None else str(program.phase),
        mesh=dict(mesh.shape),
        chips=chips,
        bytes_per_chip=peak,
        hbm_per_chip=V5P_HBM_BYTES,
        fits=peak <= V5P_HBM_BYTES,
        headroom=1 - peak / V5P_HBM_BYTES,
        memory=memory,
        model_flops=program.model_flops,
        xla_flops=cost["flops"] * chips,
        optimal_seconds=seconds,
        mfu_estimate=program.model_flops / (chips * V5P_PEAK_FLOPS * seconds) if seconds else None,
        collective_bytes=links,
    )


def _cost(compiled, mesh) -> dict:
    """XLA's per-chip FLOPs and roofline seconds (negative where it cannot estimate them), and collective bytes."""
    analysis = compiled.cost_analysis()
    seconds = analysis.get("optimal_seconds", -1.0)
    slices = {axis: mesh.shape[axis] // slice_count(mesh.devices.flat) for axis in _axes_across_slices(mesh)}
    return {
        "flops": analysis.get("flops", 0.0),
        "optimal_seconds": seconds if seconds > 0 else None,
        "collective_bytes": comms.wire_bytes_by_axes(compiled, {**dict(mesh.shape), **slices}),
    }


def _extrapolate(two: dict, three: dict, n: int) -> dict:
    """Figures at n layers (or micro-batches) from those at 2 and 3: every layer (micro-batch) costs the same."""

    def line(a, b):
        return None if a is None or b is None else a + (n - 2) * (b - a)

    axes = sorted(set(two["collective_bytes"]) | set(three["collective_bytes"]))
    bytes_two, bytes_three = two["collective_bytes"], three["collective_bytes"]
    return {
        "flops": line(two["flops"], three["flops"]),
        "optimal_seconds": line(two["optimal_seconds"], three["optimal_seconds"]),
        "collective_bytes": {a: line(bytes_two.get(a, 0), bytes_three.get(a, 0)) for a in axes},
    }


def _axes_across_slices(mesh) -> list[str]:
    """Mesh axes along which neighbouring devices sit in different slices (`data`, see sharding.make_mesh)."""
    slice_of = np.vectorize(lambda device: getattr(device, "slice_index", 0), otypes=[int])(mesh.devices)
    return [name for i, name in enumerate(mesh.axis_names) if (np.diff(slice_of, axis=i) != 0).any()]


def check(config: RunConfig, devices: list, preset: str, topology: str, prompt_length: int) -> list[Report]:
    """Compiles every program of the run (and its cost twins) and reports them."""
    try:
        mesh = make_mesh(config.mesh, devices=devices)
    except ValueError as e:
        raise AotError(f"mesh {dataclasses.asdict(config.mesh)} does not fit {topology}: {e}") from None
    # Mosaic (splash attention) compiles bfloat16 matmuls at the default precision only.
    with jax.default_matmul_precision("default"):
        programs = build_programs(config, mesh, prompt_length)
        costs = _costs(config, mesh, programs, prompt_length)
    return [analyse(p, c, mesh, preset, topology) for p, c in zip(programs, costs)]


def _costs(config: RunConfig, mesh, programs: list[Program], prompt_length: int) -> list[dict]:
    """Per chip and step: XLA's FLOPs and roofline seconds, and the bytes of collectives by mesh axes.

    XLA counts a loop's body once, so these come from loop-free twins of the programs: 2 and 3 layers unrolled,
    extrapolated to the model's depth, and a train step over M micro-batches from twins of 2 and 3 micro-batches
    (their loops, and those over logits chunks, unrolled). The twins run one replica group's share of the batch on
    its devices (data=1): every group computes alike, and the replica axis's collectives (the optimizer's, outside
    any loop) are read from the programs themselves. (Shardy, jax 0.10.2, aborts on the twins over several replicas:
    two splash calls with segment ids in one program inside the step's shard_map.) On one replica group the
    algorithm's communication is void, so the twins update with pmean's AdamW: XLA's cost model cannot time the
    compressed algorithms' collectives over a one-device axis (1-bit Adam's all-to-alls give no roofline time), and
    their optimizers differ from AdamW only in per-parameter work, small beside the model's. The sampler's loops
    (decoding, rollout chunks) stay counted once, as its model FLOPs are.
    """
    data = mesh.shape["data"]
    replica_mesh = jax.sharding.Mesh(mesh.devices[:1], mesh.axis_names, axis_types=mesh.axis_types)
    replica = dataclasses.replace(
        config,
        sft=_per_replica(config.sft, data, "batch_size", "micro_batch_size"),
        rl=_per_replica(config.rl, data, "prompts_per_step", "micro_batch_size", "rollout_batch_size"),
        comm=CommConfig(),
    )
    layers = config.model.qwen2_config().num_hidden_layers
    micro_batches = _micro_batches(replica)

    def twins(twin_config: RunConfig, names: list[str]) -> dict[str, dict]:
        """{program: its figures at the model's depth} for `twin_config`'s programs of those `names`."""
        by_depth = [
            {
                p.name: _cost(p.compiled, replica_mesh)
                for p in build_programs(twin, replica_mesh, prompt_length, True, names)
            }
            for twin in (_unrolled(twin_config, 2), _unrolled(twin_config, 3))
        ]
        return {name: _extrapolate(by_depth[0][name], by_depth[1][name], layers) for name in names}

    whole = [p.name for p in programs if micro_batches.get(p.name, 1) == 1]
    split = [p.name for p in programs if micro_batches.get(p.name, 1) > 1]
    costs = twins(replica, whole) if whole else {}
    if split:
        two, three = (twins(_with_micro_batches(replica, m), split) for m in (2, 3))
        costs |= {name: _extrapolate(two[name], three[name], micro_batches[name]) for name in split}
    result = []
    for program in programs:
        cost = costs[program.name]
        own = _cost(program.compiled, mesh)["collective_bytes"]
        across_replicas = {k: n for k, n in own.items() if k == "slices" or "data" in k}
        result.append({**cost, "collective_bytes": {**cost["collective_bytes"], **across_replicas}})
    return result


def _per_replica(section, data: int, *counts: str):
    """`section` with its batch counts divided over `data` replicas (a micro-batch is a multiple of them)."""
    return dataclasses.replace(section, **{name: getattr(section, name) // data for name in counts})


def _micro_batches(config: RunConfig) -> dict[str, int]:
    """The number of micro-batches of each train step."""
    rl_rows = config.rl.prompts_per_step * config.rl.group_size
    return {
        "sft_step": config.sft.batch_size // (config.sft.micro_batch_size or config.sft.batch_size),
        "rl_step": rl_rows // (config.rl.micro_batch_size or rl_rows),
    }


def _with_micro_batches(config: RunConfig, count: int) -> RunConfig:
    """`config` with its train steps' batches cut to `count` of their micro-batches. An RL group may straddle
    micro-batches, so the twin's groups are cut to fit them (the advantages' cost is negligible)."""
    sft, rl = config.sft, config.rl
    if sft.micro_batch_size:
        sft = dataclasses.replace(sft, batch_size=count * sft.micro_batch_size)
    if rl.micro_batch_size:
        group = math.gcd(rl.micro_batch_size, rl.group_size)
        prompts = count * rl.micro_batch_size // group
        rl = dataclasses.replace(rl, group_size=group, prompts_per_step=prompts, rollout_batch_size=0)
    return dataclasses.replace(config, sft=sft, rl=rl)


def _unrolled(config: RunConfig, layers: int) -> RunConfig:
    model = config.model
    architecture = dataclasses.replace(model.qwen2_config(), num_hidden_layers=layers)
    model = dataclasses.replace(model, architecture=architecture, pretrained=None, scan_layers=False)
    return dataclasses.replace(config, model=model)


def print_table(reports: list[Report]) -> None:
    first = reports[0]
    hbm = _gib(first.hbm_per_chip)
    print(f"{first.preset} on {first.topology}: {first.chips} chips, mesh {first.mesh}, HBM {hbm} GiB per chip")
    header = (
        "program", "phase", "GiB/chip", "params", "optim", "comm", "temp", "fits (headroom)", "model TFLOP",
        "XLA TFLOP", "est. s", "MFU", "ICI GB by axis", "DCN GB by axis",
    )  # fmt: skip
    rows = [header]
    for r in reports:
        m = r.memory
        rows.append(
            (
                r.program,
                r.phase or "-",
                _gib(r.bytes_per_chip),
                *(_gib(m.get(key, 0)) for key in ("parameters", "optimizer", "comm_state", "temporaries")),
                f"{'yes' if r.fits else 'NO'} ({r.headroom:.0%})",
                f"{r.model_flops / 1e12:.4g}",
                f"{r.xla_flops / 1e12:.4g}",
                "-" if r.optimal_seconds is None else f"{r.optimal_seconds:.3g}",
                "-" if r.mfu_estimate is None else f"{r.mfu_estimate:.0%}",
                *(
                    " ".join(f"{axes} {n / 1e9:.3g}" for axes, n in r.collective_bytes[link].items()) or "-"
                    for link in ("ici", "dcn")
                ),
            )  # fmt: skip
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print("est. s and MFU: XLA's roofline estimate for one step, not a measurement; bytes per chip and step")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metastone_jax.aot",
        description="Compile a run's programs for a TPU topology on this host and report whether they fit.",
        epilog="Example: python -m metastone_jax.aot qwen2_1.5b --topology v5p-16",
    )
    parser.add_argument("preset", help="a preset in configs/ (e.g. qwen2_1.5b) or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampling.max_new_tokens=4096")
    parser.add_argument("--topology", required=True, help="a TPU slice, e.g. v5p-16 (8 chips) or v5p:2x2x1")
    parser.add_argument("--slices", type=int, default=1, help="slices joined by DCN (the mesh's data axis spans them)")
    parser.add_argument("--prompt-length", type=int, default=1024, help="prompt tokens per row (default 1024)")
    parser.add_argument("--json", action="store_true", help="one JSON object per program instead of a table")
    args = parser.parse_args(argv)
    topology = args.topology if args.slices == 1 else f"{args.slices} x {args.topology}"
    try:
        config = load_config(args.preset, args.overrides)
        devices = tpu_devices(args.topology, args.slices)
        reports = check(config, devices, args.preset, topology, args.prompt_length)
    except (AotError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for report in reports:
            print(json.dumps(dataclasses.asdict(report)))
    else:
        print_table(reports)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")  # the TPU devices are abstract; nothing runs here
    sys.exit(main())
