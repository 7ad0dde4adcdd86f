"""`python -m metastone_jax.aot`: its errors are one sentence, and (with libtpu) the tiny preset's programs compile
for abstract TPU v5p devices with figures that agree with ones computed here from the parameters."""

import dataclasses
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comms
from metastone_jax import aot
from metastone_jax.aot_programs import build_programs
from metastone_jax.config_loading import load_config
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.sharding import make_mesh

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
requires_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile with"
)


def run(capsys, *argv):
    code = aot.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0]


def test_an_unknown_topology_is_one_error_line(capsys):
    code, _, err = run(capsys, "tiny", "--topology", "v5p-12")
    assert_one_error_line(code, err, "v5p-12", "v5p-16")


def test_a_bad_override_is_one_error_line(capsys):
    code, _, err = run(capsys, "tiny", "rl.stepz=3", "--topology", "v5p-8")
    assert_one_error_line(code, err, "rl.stepz")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here, so it cannot be missing")
def test_a_missing_libtpu_is_one_error_line(capsys):
    code, _, err = run(capsys, "tiny", "--topology", "v5p-8")
    assert_one_error_line(code, err, "libtpu", "pip install")


@requires_libtpu
@pytest.mark.parametrize(
    "overrides,slices,words",
    [
        (["mesh.data=3"], 1, ["mesh", "v5p:2x2x1"]),
        (["mesh.data=1"], 2, ["data=1", "2 slices"]),
    ],
)
def test_a_mesh_that_does_not_match_the_topology_is_one_error_line(capsys, overrides, slices, words):
    code, _, err = run(capsys, "tiny", *overrides, "--topology", "v5p:2x2x1", "--slices", str(slices))
    assert_one_error_line(code, err, *words)


def tiny_parameters():
    """(abstract parameters with their logical axis names, the ReflectiveModel) of the tiny preset."""
    module = ReflectiveModel(load_config("tiny").model.architecture)
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return boxed, module


def parameter_bytes_per_chip(fsdp: int) -> int:
    """Every parameter with an `embed` axis is split over the fsdp chips (the tiny sizes divide); the rest is whole."""
    boxed, _ = tiny_parameters()
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return sum(leaf.value.size * leaf.value.dtype.itemsize // (fsdp if "embed" in leaf.names else 1) for leaf in leaves)


def forward_flops(tokens: int, visible_pairs: int) -> float:
    """A forward pass: 2 FLOPs per multiply-add with every matrix (the kernels, and the tied embedding as the LM
    head) for each token, and causal attention's scores and weighted values for each visible (query, key) pair."""
    boxed, module = tiny_parameters()
    config = module.config
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    matrices = sum(
        leaf.size for path, leaf in flat if jax.tree_util.keystr(path).endswith(("'kernel']", "'embedding']"))
    )
    per_pair = 2 * 2 * config.head_dim * config.num_attention_heads * config.num_hidden_layers
    return 2 * matrices * tokens + per_pair * visible_pairs


def causal(length: int) -> int:
    return length * (length + 1) // 2


@pytest.fixture(scope="module")
def tiny_reports():
    """The tiny preset's RL step and sampler on one v5p:2x2x1 slice (4 chips, fsdp=4), 32 prompt tokens."""
    config = load_config("tiny", ["sft.steps=0"])
    devices = aot.tpu_devices("v5p:2x2x1", 1)
    return {r.program: r for r in aot.check(config, devices, "tiny", "v5p:2x2x1", prompt_length=32)}, config


@requires_libtpu
def test_the_tiny_rl_step_and_sampler_compile_with_the_memory_they_should_take(tiny_reports):
    reports, _ = tiny_reports
    assert set(reports) == {"rl_step", "sampler"}
    params = parameter_bytes_per_chip(fsdp=4)
    for report in reports.values():
        assert report.chips == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
        assert report.memory["parameters"] == params
        assert report.hbm_per_chip == int(95.74 * 2**30) and report.fits
        assert report.headroom == pytest.approx(1 - report.bytes_per_chip / report.hbm_per_chip)
        assert report.bytes_per_chip >= sum(v for k, v in report.memory.items() if k != "outputs_not_aliased")
    rl = reports["rl_step"].memory
    assert rl["reference"] == params  # the frozen policy, sharded like the policy
    assert rl["optimizer"] >= 2 * params  # Adam's two moments


@requires_libtpu
def test_the_tiny_programs_flops_agree_with_a_count_of_their_matrices(tiny_reports):
    reports, config = tiny_reports
    prompts, rows, length = config.rl.prompts_per_step, config.rl.prompts_per_step * config.rl.group_size, 80
    assert length == 32 + config.sampling.max_new_tokens
    # The policy's forward and backward pass (3 forward passes' worth) and the reference policy's forward pass.
    assert reports["rl_step"].model_flops == pytest.approx(4 * forward_flops(rows * length, rows * causal(length)))
    # Prefill of the prompts, then one decode step of every row, its query against the whole cache.
    sampler = forward_flops(prompts * 32, prompts * causal(32)) + forward_flops(rows, rows * length)
    assert reports["sampler"].model_flops == pytest.approx(sampler)
    for report in reports.values():
        # XLA counts the same programs (plus softmax, norms, the optimizer; without the attention kernels).
        assert 0.8 < report.xla_flops / report.model_flops < 1.25, report.program
        assert report.optimal_seconds > 0 and 0 < report.mfu_estimate < 1
        assert report.collective_bytes["ici"]["fsdp"] > 0 and report.collective_bytes["dcn"] == {}


@requires_libtpu
def test_json_output_has_one_object_per_program_with_the_documented_keys(capsys, tiny_reports):
    reports, _ = tiny_reports
    keys = {
        "preset", "topology", "program", "bytes_per_chip", "hbm_per_chip", "fits", "headroom", "model_flops",
        "xla_flops", "optimal_seconds", "mfu_estimate", "collective_bytes",
    }  # fmt: skip
    for report in reports.values():
        line = json.dumps(aot.dataclasses.asdict(report))
        assert keys <= set(json.loads(line))
    aot.print_table(list(reports.values()))
    table = capsys.readouterr().out
    assert "rl_step" in table and "sampler" in table and "not a measurement" in table


@requires_libtpu
@pytest.mark.slow  # six TPU compiles (5-6 min on 2 cores); the tiny programs' figures above run by default
def test_a_micro_batched_steps_cost_is_that_of_the_same_step_without_loops():
    """XLA counts a loop's body once. The RL step over 4 micro-batches of 8 rows, each scoring its 80 positions in
    5 logits chunks, with 4 scanned layers: the costs extrapolated from twins of 2 and 3 layers and micro-batches
    equal XLA's own count of the same step compiled with every loop unrolled."""
    config = load_config("tiny", ["sft.steps=0", "rl.micro_batch_size=8", "model.logits_chunk=16"])
    mesh = make_mesh(config.mesh, devices=aot.tpu_devices("v5p:2x2x1", 1))
    without_loops = dataclasses.replace(config, model=dataclasses.replace(config.model, scan_layers=False))
    with jax.default_matmul_precision("default"):
        programs = build_programs(config, mesh, prompt_length=32, names=["rl_step"])
        (estimate,) = aot._costs(config, mesh, programs, prompt_length=32)
        (unrolled,) = build_programs(without_loops, mesh, prompt_length=32, for_cost=True, names=["rl_step"])
    counted, looped = aot._cost(unrolled.compiled, mesh), aot._cost(programs[0].compiled, mesh)
    assert estimate["flops"] == pytest.approx(counted["flops"], rel=1e-3)
    # The roofline adds up per-operation bounds; fusion differs a little between the twins and the whole program.
    assert estimate["optimal_seconds"] == pytest.approx(counted["optimal_seconds"], rel=0.1)
    assert estimate["collective_bytes"] == pytest.approx(counted["collective_bytes"], rel=1e-3)
    assert looped["flops"] < counted["flops"] / 4  # what the step's own cost analysis says


@requires_libtpu
def test_a_compressed_algorithms_step_gets_a_roofline_time_and_an_mfu():
    # 1-bit Adam after its warm-up: its all-to-alls over a one-device replica axis have no roofline time in XLA's
    # cost model, so the twins that the estimate comes from must not contain them.
    config = load_config("tiny", ["rl.steps=0", "comm.algorithm=onebit_adam", "comm.options={warmup_steps: 1}"])
    devices = aot.tpu_devices("v5p:2x2x1", 1)
    (report,) = aot.check(config, devices, "tiny", "v5p:2x2x1", prompt_length=32)
    assert report.program == "sft_step" and report.phase == "compressed"
    assert report.optimal_seconds > 0 and 0 < report.mfu_estimate < 1


def dcn_bytes(algorithm: list[str]) -> int:
    """Bytes per chip that the RL step sends across the 2 slices of 2 x v5p:2x2x1 (data=2 over the slices)."""
    config = load_config("tiny", ["sft.steps=0", "mesh.data=2", *algorithm])
    mesh = make_mesh(config.mesh, devices=aot.tpu_devices("v5p:2x2x1", 2))
    with jax.default_matmul_precision("default"):
        step = build_programs(config, mesh, prompt_length=32)[0]
    assert step.name == "rl_step"
    per_slice = {"data": 1, "fsdp": 4, "tensor": 1}
    return comms.wire_bytes_by_axes(step.compiled, per_slice)["slices"]


@requires_libtpu
def test_across_slices_onebit_adam_sends_one_bit_per_value_where_pmean_sends_32():
    boxed, _ = tiny_parameters()
    values = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(boxed)))
    full = dcn_bytes(["comm.algorithm=pmean"])
    onebit = dcn_bytes(["comm.algorithm=onebit_adam", "comm.options={warmup_steps: 1}"])
    # pmean: at least every chip's quarter (fsdp=4) of the float32 gradient; XLA reduces some leaves whole.
    assert values * 4 / 4 <= full <= values * 4
    # 1-bit Adam, compressed: the packed signs of every momentum value to the servers and back (the leaves are
    # compressed whole on every chip), headers and the metrics' all-reduce within 1%.
    np.testing.assert_allclose(onebit, 2 * values / 8, rtol=0.01)
    assert onebit < full / 5
