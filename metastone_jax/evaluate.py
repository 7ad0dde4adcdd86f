"""`python -m metastone_jax.evaluate`: test-time scaling (low / medium / high = 2 / 8 / 32 samples) with the SPRM.

For every question it samples n trajectories once, scores each from the hidden states the sampler computed anyway
(no second forward pass), and evaluates every mode on the same samples as the released evaluation does: groups of k
out of n, the pick of each group, averaged over groups. Writes `eval.json`, `samples.jsonl`, `scaling.png`
(accuracy against thinking compute = parameters x generated tokens) and, where steps can be checked (the embedded
task), `calibration.png` (reliability diagram of step scores), and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metastone_jax import tts
from metastone_jax.config import RunConfig, SamplingConfig
from metastone_jax.config_loading import load_config
from metastone_jax.data import (
    ArithmeticTask,
    TextTokenizer,
    build_arithmetic_tokenizer,
    extract_answer,
    is_equivalent,
    load_records,
)
from metastone_jax.data.arithmetic import step_correctness
from metastone_jax.distributed import initialize_from_env
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.plots import plot_calibration, plot_scaling
from metastone_jax.rollout import encode_prompts, score_trajectories
from metastone_jax.sampling import sample
from metastone_jax.sharding import make_mesh, to_host

# Evaluation questions of the embedded task start at this index, so that question i does not share its random
# stream with training problem i (that they are never training questions is the task's eval split's doing).
EVAL_INDEX_OFFSET = 10**12
# Rows (questions x samples) sampled in one call: bounds the KV cache of an evaluation batch.
ROWS_PER_CALL = 512
# Metrics that do not depend on k, repeated in each mode's row of eval.json.
SHARED_METRICS = ("pass@1", "auroc_within", "auroc_within_questions", "auroc_pooled", "step_auroc")


@dataclasses.dataclass
class EvalResult:
    # {"pass@1", "maj@k", "wmaj@k", "sprm@k", "oracle@k", "auroc_within", "auroc_pooled", "step_auroc",
    #  "step_calibration", "modes": {...}, ...}; see benchmark_metrics
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]


def parameter_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def evaluate_records(
    module: ReflectiveModel,
    params: Any,
    tokenizer: TextTokenizer,
    records: Sequence[dict[str, str]],
    *,
    sampling: SamplingConfig,
    num_samples: int,
    modes: dict[str, int] | Sequence[str] = tuple(tts.MODES),
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    instruction: str | None = None,
) -> EvalResult:
    """Samples `num_samples` trajectories per record {"question", "answer"} and computes every metric per mode.

    `modes`: names of tts.MODES (low, medium, high) or a {name: k} dict for other k. Prompts are in the tokenizer's
    prompt format with `instruction` (see data.prompts). A record with "checkable_steps": True (the embedded
    task's, `embedded_eval_records`) gets each sample's steps verified (data.arithmetic.step_correctness, aligned
    with its step scores); other samples record step_correct None.
    """
    modes = modes if isinstance(modes, dict) else {mode: tts.MODES[mode] for mode in modes}
    too_big = [(mode, k) for mode, k in modes.items() if k > num_samples]
    if too_big:
        raise ValueError(
            f"mode {too_big[0][0]!r} needs k={too_big[0][1]} samples per question but only {num_samples} are drawn; "
            f"raise the number of samples to at least {max(modes.values())}"
        )
    if not module.with_head:
        raise ValueError("the model has no SPRM head (score_module.pt): best-of-k selection needs one")
    think_ids = tuple(tokenizer.think_ids) if tokenizer.think_ids else None
    per_call = max(1, ROWS_PER_CALL // num_samples)
    samples: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    batches = range(0, len(records), per_call)
    for start in tqdm(batches, desc="evaluate", unit="batch", dynamic_ncols=True, disable=jax.process_index() > 0):
        chunk = records[start : start + per_call]
        prompt_tokens, prompt_mask = encode_prompts(tokenizer, [r["question"] for r in chunk], instruction)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            out = sample(
                module,
                params,
                prompt_tokens,
                prompt_mask,
                jax.random.fold_in(key, start),
                config=sampling,
                eos_ids=(tokenizer.eos_id,),
                pad_id=tokenizer.pad_id,
                num_samples=num_samples,
            )
        step_mask, scores = score_trajectories(out, tuple(tokenizer.delimiter_ids), think_ids)
        sequences, response_mask = to_host(out.sequences), to_host(out.response_mask)
        step_mask, step_logits, scores = to_host(step_mask), to_host(out.step_logits), to_host(scores)
        lengths = to_host(out.lengths)
        for row in range(len(sequences)):
            record = chunk[row // num_samples]
            response_tokens = sequences[row][response_mask[row]]
            text = tokenizer.decode(response_tokens)
            answer = extract_answer(text)
            step_scores = (1 / (1 + np.exp(-step_logits[row][step_mask[row]]))).round(6).tolist()
            samples.append(
                {
                    "question_index": start + row // num_samples,
                    "question": record["question"],
                    "reference": record["answer"],
                    "response": text,
                    "answer": answer,
                    "correct": bool(is_equivalent(answer, record["answer"])),
                    "step_scores": step_scores,
                    "step_correct": _checked_steps(text, len(step_scores)) if record.get("checkable_steps") else None,
                    "score": float(scores[row]),
                    "tokens": int(lengths[row]),
                    # False: cut off at max_new_tokens before an EOS.
                    "finished": bool(len(response_tokens) and response_tokens[-1] == tokenizer.eos_id),
                }
            )
    metrics = benchmark_metrics(samples, num_samples, modes, parameter_count(params))
    return EvalResult(metrics, samples)


def _checked_steps(response: str, num_scores: int) -> list[bool] | None:
    """The verdict on each step of an embedded-task response, or None when the text's steps do not line up one to
    one with the scored ones (a special token the decoded text dropped, e.g. a pad between two delimiters)."""
    verdicts = step_correctness(response)
    return verdicts if len(verdicts) == num_scores else None


def benchmark_metrics(samples: list[dict], num_samples: int, modes: dict[str, int], num_params: int) -> dict:
    """tts metrics over questions (tts.evaluate_benchmark), step metrics over the samples whose steps were checked
    (tts.step_metrics), plus per mode its k, accuracies, AUROCs and thinking compute (parameters x tokens)."""
    by_question = [samples[i : i + num_samples] for i in range(0, len(samples), num_samples)]
    ks = list(modes.values())
    metrics = tts.evaluate_benchmark(
        [[s["score"] for s in q] for q in by_question],
        [[s["correct"] for s in q] for q in by_question],
        [[s["answer"] for s in q] for q in by_question],
        ks,
    )
    metrics.update(tts.step_metrics([s["step_scores"] for s in samples], [s["step_correct"] for s in samples]))
    metrics["finished"] = float(np.mean([s["finished"] for s in samples]))
    mean_tokens = float(np.mean([s["tokens"] for s in samples]))
    metrics["mean_response_tokens"] = mean_tokens
    metrics["parameters"] = num_params
    metrics["modes"] = {
        mode: {
            "k": k,
            **{name: metrics[name] for name in SHARED_METRICS},
            **{f"{method}@{k}": metrics[f"{method}@{k}"] for method in tts.METHODS},
            # Thinking compute per question: k trajectories of the mean length through the whole model.
            "compute": float(num_params * k * mean_tokens),
        }
        for mode, k in modes.items()
    }
    return metrics


def write_outputs(result: EvalResult, out_dir: Path) -> list[Path]:
    """eval.json (every metric per mode; NaN as null), samples.jsonl (every sample), scaling.png and, when steps
    were checked, calibration.png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "eval.json", out_dir / "samples.jsonl", out_dir / "scaling.png"]
    paths[0].write_text(json.dumps(_nan_to_none(result.metrics), indent=2))
    with open(paths[1], "w") as f:
        for sample_record in result.samples:
            f.write(json.dumps(sample_record) + "\n")
    plot_scaling(result.metrics, paths[2])
    if result.metrics["steps_checked"]:
        paths.append(out_dir / "calibration.png")
        plot_calibration(result.metrics, paths[3])
    return paths


def _nan_to_none(value: Any) -> Any:
    """NaN (an AUROC without both classes, an empty bin) becomes null: json.dumps would write NaN, which is not JSON."""
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return None if isinstance(value, float) and np.isnan(value) else value


def print_table(result: EvalResult) -> None:
    """A row per mode (accuracy of each method, compute), then how well the SPRM separates right from wrong."""
    metrics = result.metrics
    print(
        f"{'mode':<8} {'k':>3} {'pass@1':>7} {'maj@k':>7} {'wmaj@k':>7} {'sprm@k':>7} {'oracle@k':>8} {'compute':>10}"
    )
    for mode, m in metrics["modes"].items():
        k = m["k"]
        print(
            f"{mode:<8} {k:>3} {m['pass@1']:>7.3f} {m[f'maj@{k}']:>7.3f} {m[f'wmaj@{k}']:>7.3f} "
            f"{m[f'sprm@{k}']:>7.3f} {m[f'oracle@{k}']:>8.3f} {m['compute']:>10.3g}"
        )
    step = (
        f"step {metrics['step_auroc']:.3f} ({metrics['steps_checked']} steps)" if metrics["steps_checked"] else "step -"
    )
    print(
        f"SPRM AUROC: within-question {metrics['auroc_within']:.3f} ({metrics['auroc_within_questions']} questions), "
        f"pooled {metrics['auroc_pooled']:.3f}, {step}   questions {metrics['questions']}, samples {metrics['samples']}"
    )


def embedded_eval_records(task: ArithmeticTask, questions: int) -> list[dict[str, Any]]:
    """`questions` distinct evaluation questions of the embedded task, never seen in training: they come from the
    task's eval split, a set of question texts (by hash, data/arithmetic.py) that the training stream never draws,
    whatever the run's length, seed or knobs. Their steps can be checked ("checkable_steps": True)."""
    records: dict[str, dict[str, Any]] = {}
    # The eval split holds few short questions (1/16 of a few thousand), so draws repeat; a bound ends tiny tasks.
    for index in range(EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + 100 * questions):
        if len(records) == questions:
            break
        problem = task.sample(index, "eval")
        records.setdefault(problem["question"], {**problem, "checkable_steps": True})
    if len(records) < questions:
        raise ValueError(
            f"the embedded task's eval split gave only {len(records)} distinct questions, fewer than the {questions} "
            "asked for; ask for fewer questions or widen the task (task.arithmetic.num_steps, operand_range)"
        )
    return list(records.values())


def eval_records(config: RunConfig) -> list[dict[str, str]]:
    """The run's evaluation questions: the first `eval.questions` of the first task file, or held-out problems of
    the embedded task."""
    task = config.task
    if not task.files:
        return embedded_eval_records(task.arithmetic, config.eval.questions)
    records = load_records(
        task.files[0],
        question_field=task.question_field,
        answer_field=task.answer_field,
        answer_format=task.answer_format,
    )
    return records[: config.eval.questions]


def build_tokenizer(config: RunConfig) -> TextTokenizer:
    """`model.tokenizer`, else the pretrained model's tokenizer.json, else the embedded task's tokenizer."""
    if config.model.tokenizer:
        return TextTokenizer.from_file(config.model.tokenizer)
    if config.model.pretrained:
        return TextTokenizer.from_file(config.model.pretrained)
    return build_arithmetic_tokenizer(config.task.arithmetic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metastone_jax.evaluate",
        description="Test-time scaling with the SPRM: sample n trajectories per question, pick the best of k.",
        epilog="Example: python -m metastone_jax.evaluate runs/x eval.questions=64 eval.modes=[low,medium] "
        "sampling.temperature=0.6",
    )
    parser.add_argument(
        "model",
        help="a Hugging Face directory (config.json, safetensors, score_module.pt, tokenizer.json) or a run "
        "directory of ours (its exported model/)",
    )
    parser.add_argument(
        "preset",
        nargs="?",
        help="a preset in configs/ or a .yaml path for the eval, sampling and task keys (default: the run "
        "directory's config.yaml, else tiny)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.questions=64")
    parser.add_argument("--out", help="output directory (default: <model>/eval)")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run with jax.distributed.initialize() (TPU pods, SLURM: auto-detected)",
    )
    args = parser.parse_args(argv)
    if args.preset and "=" in args.preset:
        args.overrides.insert(0, args.preset)
        args.preset = None
    # Under launch.local_cluster or --distributed every process samples its share; the first one writes.
    initialize_from_env(auto_detect=args.distributed)
    try:
        result, out_dir = _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        paths = write_outputs(result, out_dir)
        print_table(result)
        print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


def _run(args) -> tuple[EvalResult, Path]:
    from metastone_jax.hf import load_hf

    model_dir = Path(args.model)
    preset = args.preset
    if (model_dir / "model" / "config.json").is_file():  # a run directory of ours
        if preset is None and (model_dir / "config.yaml").is_file():
            preset = model_dir / "config.yaml"
        model_dir = model_dir / "model"
    config = load_config(preset, [*args.overrides, f"model.pretrained={model_dir}"])
    if config.model.tokenizer is None and not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}; set model.tokenizer=PATH")
    tokenizer = build_tokenizer(config)
    # The model sharded over the configured mesh of every device (of every process): fsdp by default.
    model = load_hf(model_dir, mesh=make_mesh(config.mesh), dtype=jnp.dtype(config.model.dtype))
    if not model.module.with_head:
        raise FileNotFoundError(f"no SPRM head in {model_dir}: expected score_module.pt (or score_module.safetensors)")
    result = evaluate_records(
        model.module,
        model.params,
        tokenizer,
        eval_records(config),
        sampling=config.eval_sampling,
        num_samples=config.eval.samples,
        modes=config.eval.ks,
        seed=config.seed,
        mesh=model.mesh,
        instruction=config.task.instruction,
    )
    return result, Path(args.out) if args.out else model_dir / "eval"


if __name__ == "__main__":
    sys.exit(main())
