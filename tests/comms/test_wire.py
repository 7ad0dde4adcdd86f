import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import comms

HAND_WRITTEN_HLO = """
HloModule example, entry_computation_layout={(f32[256]{0})->f32[256]{0}}

%wrapped_all_to_all (p0: u8[4,8], p1: u8[4,8]) -> (u8[4,8], u8[4,8]) {
  %p0 = u8[4,8]{1,0} parameter(0)
  %p1 = u8[4,8]{1,0} parameter(1)
  ROOT %all-to-all.1 = (u8[4,8]{1,0}, u8[4,8]{1,0}) all-to-all(%p0, %p1), channel_id=3, replica_groups={{0,1,2,3}}
}

ENTRY %main (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %codes = u8[4,8]{1,0} parameter(1)
  %all-reduce-start = f32[256]{0} all-reduce-start(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce-done = f32[256]{0} all-reduce-done(%all-reduce-start)
  %ag = (bf16[10]{0}, f32[3]{0}) all-gather(bf16[10]{0} %a, f32[3]{0} %b), dimensions={0}
  %async = ((u8[4,8]{1,0}, u8[4,8]{1,0}), (u8[4,8]{1,0}, u8[4,8]{1,0})) async-start(%codes, %codes), calls=%wrapped_all_to_all
  %rs = f32[64]{0} reduce-scatter(%x), dimensions={0}, to_apply=%add
  %cp-start = (s32[2]{0}, s32[2]{0}, u32[], u32[]) collective-permute-start(%idx), source_target_pairs={{0,1}}
  %idx = s32[2]{0} parameter(2)
  ROOT %out = f32[256]{0} add(%all-reduce-done, %all-reduce-done)
}
"""


def test_wire_bytes_of_hand_written_hlo_counts_each_collective_once():
    got = comms.wire_bytes(HAND_WRITTEN_HLO)
    want = {
        "all-reduce": 256 * 4,  # the -start, not the -done
        "all-gather": 10 * 2 + 3 * 4,  # tuple operands with inline shapes
        "all-to-all": 2 * 32,  # inside the async wrapper; the async-start itself is not counted again
        "reduce-scatter": 256 * 4,
        "collective-permute": 2 * 4,
    }
    assert got == {**want, "total": sum(want.values())}


def test_shape_bytes_of_scalars_tuples_and_tokens():
    from comms.wire import shape_bytes

    assert shape_bytes("f32[]") == 4
    assert shape_bytes("(u8[3,5]{1,0}, f64[2]{0}, token[])") == 15 + 16
    assert shape_bytes("bf16[<=7]") == 14


def compiled_reduce(algorithm, n, numel):
    """Compiles (does not run) one reduce_gradients over n replicas of a gradient: one [numel] leaf, or a list of
    leaves of the given sizes."""
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
    spec = P("data")

    def step(grads):
        grads = comms.strip_replica_dim(grads)
        state = algorithm.init(grads)
        return comms.add_replica_dim(algorithm.reduce_gradients(grads, state, jnp.int32(0))[0])

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=spec))
    leaves = jax.tree.map(lambda size: jax.ShapeDtypeStruct((n, size), jnp.float32), numel)
    return fn.lower(leaves).compile()


def test_pmean_wire_bytes_are_the_float32_gradient():
    assert comms.wire_bytes(compiled_reduce(comms.get("pmean"), 4, 1000))["total"] == 4000


@pytest.mark.parametrize("name,max_ratio", [("onebit", 1 / 25), ("bytegrad", 1 / 3.5)])
def test_compressed_wire_bytes_shrink_against_pmean(name, max_ratio):
    n, numel = 8, 1 << 20
    full = comms.wire_bytes(compiled_reduce(comms.get("pmean"), n, numel))
    compressed = comms.wire_bytes(compiled_reduce(comms.get(name), n, numel))
    assert full["total"] == 4 * numel
    assert compressed["all-reduce"] == 0  # nothing travels as a float all-reduce
    assert compressed["total"] <= max_ratio * full["total"]
    # Expected payload: uint8 codes (8-bit) or packed signs (1-bit) for all-to-all plus an all-gather of one chunk.
    payload = numel // 8 if name == "onebit" else numel
    np.testing.assert_allclose(compressed["total"], payload * (1 + 1 / n), rtol=1e-3)


def count_collectives(compiled) -> int:
    """Collective instructions in the compiled HLO (an async pair counts once, at its start)."""
    kinds = "all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute"
    return len(re.findall(rf"\s(?:{kinds})(?:-start)?\(", compiled.as_text()))


@pytest.mark.parametrize("name", ["onebit", "bytegrad"])
def test_per_tensor_compression_sends_all_leaves_in_the_same_collectives(name):
    n = 4
    one_leaf = compiled_reduce(comms.get(name), n, [1000])
    many_leaves = compiled_reduce(comms.get(name), n, [1000, 3, 77, 512, 1])
    # One all-to-all and one all-gather: the float headers travel as bytes inside the payload's collective.
    assert count_collectives(many_leaves) == count_collectives(one_leaf) == 2
    # Each leaf is padded on its own to a multiple of n * 8; payload bytes per padded value: 1/8 or 1.
    padded = sum(-(-size // (n * 8)) * n * 8 for size in [1000, 3, 77, 512, 1])
    payload = padded // 8 if name == "onebit" else padded
    got = comms.wire_bytes(many_leaves)
    assert got["all-to-all"] + got["all-gather"] == got["total"]
    # float32 per leaf: 1-bit sends its scale to each of the n servers and each server's scale back; MinMax sends
    # (min, max) per chunk both ways.
    headers = 5 * 4 * (n + 1 if name == "onebit" else 2 * n + 2)
    assert got["total"] == payload * (1 + 1 / n) + headers


def test_operand_lists_with_index_comments_count_every_operand():
    # XLA prints /*index=5*/ before the 6th operand of long operand lists; the comment must not hide it.
    hlo = "\n".join(
        [f"  %p{i} = f32[{i + 1},8]{{1,0}} parameter({i})" for i in range(7)]
        + [
            "  ROOT %all-reduce.1 = (f32[1,8], f32[2,8], f32[3,8], f32[4,8], f32[5,8], f32[6,8], f32[7,8]) "
            "all-reduce(%p0, %p1, %p2, %p3, %p4, /*index=5*/%p5, %p6), replica_groups={{0,1}}, to_apply=%add"
        ]
    )
    got = comms.wire_bytes(hlo)
    assert got["all-reduce"] == got["total"] == sum((i + 1) * 8 * 4 for i in range(7))
