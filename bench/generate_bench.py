"""Generation throughput of our sampler against transformers' `generate`, and what SPRM scoring costs.

Same random tiny Qwen2 weights on both sides (written by transformers, read back with `load_hf`), same sampling
settings (temperature, top-p), every row generating exactly --new-tokens tokens (no EOS), --samples per prompt.
SPRM cost: our sampler with the head (step logits read during decoding) against the same backbone without it,
next to a separate reward model of the same size that needs a second full forward over the finished sequences.

    .venv/bin/python bench/generate_bench.py [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import metastone_jax as ms
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.sampling import SamplingConfig, sample


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def best_times(runs: dict, repeats: int) -> dict[str, float]:
    """Seconds of the fastest of `repeats` runs of each callable, after one warm-up each (compilation excluded).

    Runs alternate round by round so that load from other processes hits all of them alike.
    """
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def build_models(args, directory: str):
    """A random transformers Qwen2 with a random SPRM head saved to `directory`; returns (torch model, our Model)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.prompt_length + args.new_tokens,
        tie_word_embeddings=False,
    )
    reference = transformers.Qwen2ForCausalLM(config).eval()
    reference.save_pretrained(directory)
    head = torch.nn.Sequential(
        torch.nn.Linear(args.hidden, 2 * args.hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(2 * args.hidden, 1),
    )
    torch.save(head.state_dict(), f"{directory}/score_module.pt")
    return reference, ms.load_hf(directory)


def main():
    args = parse_args()
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (args.prompts, args.prompt_length)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    rows = args.prompts * args.samples
    generated_tokens = rows * args.new_tokens
    config = SamplingConfig(args.new_tokens, temperature=args.temperature, top_p=args.top_p)

    with tempfile.TemporaryDirectory() as directory:
        reference, model = build_models(args, directory)
    with_head = model.module
    assert with_head.with_head, "load_hf should have read score_module.pt"
    without_head = ReflectiveModel(with_head.config, with_head=False)
    backbone_params = {name: value for name, value in model.params.items() if name != "sprm"}
    matmul_parameters = sum(x.size for x in jax.tree.leaves(backbone_params)) - args.vocab * args.hidden

    def ours(module, params):
        def run():
            out = sample(
                module,
                params,
                prompts,
                mask,
                jax.random.key(0),
                config=config,
                eos_ids=(-1,),
                pad_id=0,
                num_samples=args.samples,
            )
            jax.block_until_ready(out)
            return out

        return run

    # A separate reward model of the same size: one more full forward over every finished sequence.
    sequences = ours(without_head, backbone_params)().sequences
    reward_forward = jax.jit(lambda params, tokens: with_head.apply({"params": params}, tokens).step_logits)

    def separate_reward_model():
        jax.block_until_ready(reward_forward(model.params, sequences))

    def transformers_generate():
        with torch.no_grad():
            reference.generate(
                torch.from_numpy(prompts).long(),
                attention_mask=torch.from_numpy(mask).long(),
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                num_return_sequences=args.samples,
                pad_token_id=0,
            )

    seconds = best_times(
        {
            "ours_with_sprm": ours(with_head, model.params),
            "ours_without_sprm": ours(without_head, backbone_params),
            "transformers_generate": transformers_generate,
            "separate_reward_forward": separate_reward_model,
        },
        args.repeats,
    )
    results = {
        "device": jax.devices()[0].device_kind,
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
            "generated_tokens": generated_tokens,
        },
        "seconds": seconds,
        "tokens_per_second": {
            name: generated_tokens / seconds[name]
            for name in ("ours_with_sprm", "ours_without_sprm", "transformers_generate")
        },
        "speedup_vs_transformers": seconds["transformers_generate"] / seconds["ours_with_sprm"],
        "sprm_overhead": seconds["ours_with_sprm"] / seconds["ours_without_sprm"] - 1.0,
        "separate_reward_model_overhead": seconds["separate_reward_forward"] / seconds["ours_without_sprm"],
        # Per generated token the head's matmuls against the backbone's (the embedding lookup is no matmul).
        "sprm_matmul_fraction": with_head.config.sprm_parameter_count / matmul_parameters,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{args.prompts} prompts x {args.samples} samples, prompt {args.prompt_length} + {args.new_tokens} new "
        f"tokens, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, T={args.temperature}, "
        f"top_p={args.top_p} on {results['device']}"
    )
    print(f"{'run':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, value in seconds.items():
        rate = results["tokens_per_second"].get(name)
        print(f"{name:<28}{value:>10.4f}{'' if rate is None else f'{rate:>12.0f}'}")
    print(f"ours / transformers speed: {results['speedup_vs_transformers']:.2f}x")
    print(
        f"SPRM scoring in the sampler: {100 * results['sprm_overhead']:+.2f}% of generation time "
        f"(head matmuls: {100 * results['sprm_matmul_fraction']:.2f}% of the backbone's)"
    )
    print(
        f"separate reward model (2nd forward): {100 * results['separate_reward_model_overhead']:+.2f}% of "
        "generation time"
    )


if __name__ == "__main__":
    main()
