"""Forward and forward+backward tokens/s of our Qwen2 against transformers' on the same config and weights.

    python bench/model_bench.py [--layers 4 --hidden 256 --batch 8 --seq 256 --repeats 7] [--scan-layers]
                                [--malloc hugetlb|reuse] [--json]

Both run in this process on the CPU in float32; the ratio (ours / transformers) is what BENCHMARKS.md records.
`--malloc` restarts the script with glibc's malloc tuned (both frameworks share the process, so both get it):
`hugetlb` backs large blocks with huge pages, as `launch.local_cluster` runs its processes; `reuse` keeps freed
memory in the heap for the next call (no block is mapped afresh, so no page faults in the steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import metastone_jax as ms
from launch.local_cluster import glibc_tunables, huge_page_tunables

# XLA:CPU allocates each execution's temporaries as one block; glibc maps a block over 32 MB afresh for every call
# and each first touch of a page faults (~100k faults per step here). Torch's tensors are smaller and come back from
# the heap.
MALLOC = {
    "hugetlb": huge_page_tunables,
    "reuse": lambda env: glibc_tunables(
        env, "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
    ),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_of_alternating(ours, theirs, repeats: int) -> tuple[float, float, float]:
    """Best time of each and the median of the per-round ratios; rounds alternate so both see the same load."""
    ours(), theirs()  # warm-up (and compile)
    rounds = [(_timed(ours), _timed(theirs)) for _ in range(repeats)]
    return (
        min(o for o, _ in rounds),
        min(t for _, t in rounds),
        statistics.median(t / o for o, t in rounds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scan-layers", action="store_true", help="keep the layer stack scanned (default: unrolled)")
    parser.add_argument(
        "--malloc", choices=sorted(MALLOC), help="tune glibc's malloc for the run (default: as inherited)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args()
    tunables = MALLOC[args.malloc](os.environ) if args.malloc else os.environ.get("GLIBC_TUNABLES", "")
    if tunables != os.environ.get("GLIBC_TUNABLES", ""):  # glibc reads it at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})

    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(config).float()
    reference.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        ours = ms.load_hf(path, with_head=False, scan_layers=args.scan_layers)

    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    torch_tokens = torch.from_numpy(tokens).long()
    jax_tokens = jnp.asarray(tokens, jnp.int32)
    module, params = ours.module, ours.params

    @jax.jit
    def forward(params, tokens):
        return module.apply({"params": params}, tokens).logits

    def loss(params, tokens):
        logits = module.apply({"params": params}, tokens).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grad = jax.jit(jax.grad(loss))

    def torch_forward():
        with torch.no_grad():
            reference(torch_tokens).logits.sum().item()

    def torch_backward():
        reference.zero_grad(set_to_none=True)
        logits = reference(torch_tokens).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), torch_tokens[:, 1:].reshape(-1)).backward()

    runs = {
        "forward": (lambda: forward(params, jax_tokens).block_until_ready(), torch_forward),
        "forward+backward": (lambda: jax.block_until_ready(grad(params, jax_tokens)), torch_backward),
    }
    tokens_per_step = args.batch * args.seq
    rows = []
    for name, (ours_fn, theirs_fn) in runs.items():
        ours_s, theirs_s, median_ratio = _best_of_alternating(ours_fn, theirs_fn, args.repeats)
        rows.append(
            {
                "pass": name,
                "ours_tokens_per_s": tokens_per_step / ours_s,
                "transformers_tokens_per_s": tokens_per_step / theirs_s,
                "ratio": theirs_s / ours_s,
                "median_round_ratio": median_ratio,
            }
        )
    if args.json:
        for row in rows:
            print(
                json.dumps({**row, **vars(args), "glibc_tunables": tunables, "torch_threads": torch.get_num_threads()})
            )
        return
    print(
        f"Qwen2 {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
        f"batch {args.batch} x seq {args.seq}, float32, CPU, torch threads {torch.get_num_threads()}"
    )
    print(
        f"layers {'scanned' if args.scan_layers else 'unrolled'}, GLIBC_TUNABLES={tunables or '(unset)'}; "
        "ratio = best / best, median = of per-round ratios"
    )
    print(f"{'pass':<18} {'ours tok/s':>12} {'transformers tok/s':>20} {'ratio':>7} {'median':>7}")
    for row in rows:
        print(
            f"{row['pass']:<18} {row['ours_tokens_per_s']:>12.0f} {row['transformers_tokens_per_s']:>20.0f} "
            f"{row['ratio']:>6.2f}x {row['median_round_ratio']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
