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


AXES_HLO = """
ENTRY %main (x: f32[64]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  %ar.data = f32[64]{0} all-reduce(%x), channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  %ag.fsdp = f32[128]{0} all-gather(%x), channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}
  %ag.tensor = f32[128]{0} all-gather(%x), channel_id=3, replica_groups=[4,2]<=[4,2]T(1,0), dimensions={0}
  %rs.both = f32[16]{0} reduce-scatter(%x), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %cp.data = f32[64]{0} collective-permute(%x), channel_id=5, source_target_pairs={{0,4},{4,0}}
  %ar.self = f32[64]{0} all-reduce(%x), channel_id=6, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add
  %ar.all = f32[64]{0} all-reduce(%x), channel_id=7, replica_groups={}, to_apply=%add
  %send = (f32[8]{0}, u32[], token[]) send(f32[8]{0} %y, token[] %t), channel_id=8, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = f32[64]{0} add(%x, %x)
}
"""


def test_wire_bytes_by_axes_names_the_mesh_axes_each_collective_spans():
    # Mesh data=2 x fsdp=2 x tensor=2; device d sits at (d // 4, d // 2 % 2, d % 2).
    got = comms.wire_bytes_by_axes(AXES_HLO, {"data": 2, "fsdp": 2, "tensor": 2})
    assert got == {
        "data": 64 * 4 + 64 * 4,  # the all-reduce over {d, d+4} and the permute 0 <-> 4
        "tensor": 64 * 4,  # iota groups [4,2]<=[8]: {0,1}, {2,3}, ... differ in the last axis
        "fsdp": 64 * 4,  # [4,2]<=[4,2]T(1,0): {0,2}, {1,3}, {4,6}, {5,7}
        "fsdp+tensor": 64 * 4,  # a named 2 x 4 mesh over its 4-device axis: {0..3}, {4..7}
        "data+fsdp+tensor": 64 * 4,  # no groups: every device
        "slices": 8 * 4,  # a transfer to the other slices (megascale send); one device groups move nothing
    }
    assert comms.wire_bytes(AXES_HLO)["total"] == 7 * 64 * 4 + 8 * 4


def test_wire_bytes_by_axes_of_compiled_collectives_over_each_axis_of_a_mesh():
    mesh = jax.make_mesh(
        (2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:4]
    )

    def step(x):
        return jax.lax.psum(x, "data") + jax.lax.psum(x, "fsdp") + jax.lax.psum(x, ("data", "fsdp"))

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data", "fsdp"), out_specs=P("data", "fsdp")))
    compiled = fn.lower(jax.ShapeDtypeStruct((2, 2 * 250), jnp.float32)).compile()
    got = comms.wire_bytes_by_axes(compiled, {"data": 2, "fsdp": 2})
    assert got == {"data": 1000, "fsdp": 1000, "data+fsdp": 1000}  # each psum's operand: 1 x 250 float32
