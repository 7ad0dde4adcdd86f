"""DiLoCo against pmean on a tiny LM at equal tokens: the held-out loss of the model each one ends with.

    JAX_PLATFORMS=cpu python bench/diloco_lm_bench.py [key=value ...] [--steps 1024] [--seeds 3] [--plot FILE.png]
        [--json] [--runs 'pmean' 'diloco[inner_steps=8][compression=int4]' ...]

Every run is the main job's SFT phase (`metastone_jax.train.Trainer`, `rl.steps=0`) on the embedded arithmetic
task, on `--replicas` fake CPU devices (`mesh.data`); every run is repeated under seeds 0..--seeds-1 (initial
parameters and training stream), so that runs of one seed start from the same parameters and see the same batches.
The key=value arguments (before --runs) override the config of every run, the `micro` preset (the shape of
tests/test_train.py). A run is `pmean` or `diloco` with its options in brackets, as comms_bench's labels.

The loss compared is that of the synchronised model, the one a run ends with: pmean's parameters, DiLoCo's anchor
right after a sync (every --eval-every updates, a multiple of H), as next-token cross entropy on the reference
solutions of --held-out questions of the task's eval split, which training never draws. The replicas' own training
loss between syncs is a different quantity (each replica has drifted on its quarter of the batch) and is printed
beside it (mean over the last H updates). Printed: a table of final held-out loss and its ratio to pmean's; --plot
draws every run's held-out curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = "micro"  # configs/micro.yaml, the shape of tests/test_train.py
SFT_ONLY = ["rl.steps=0", "eval.questions=0", "checkpoint.every=0"]
# The paper's outer optimizer (lr 0.7, Nesterov 0.9) from the start and after a synchronous warm-up, and plain
# averaging of the pseudo-gradients (outer lr 1, no momentum) after the warm-up, uncompressed and in 4 bits.
AVERAGING = "[outer_momentum=0.0][outer_learning_rate=1.0][warmup_steps=64]"
DEFAULT_RUNS = [
    "pmean",
    "diloco[inner_steps=8]",
    "diloco[inner_steps=8][warmup_steps=64]",
    f"diloco[inner_steps=8]{AVERAGING}",
    f"diloco[inner_steps=8]{AVERAGING}[compression=int4]",
]


def parse_run(run: str) -> tuple[str, dict]:
    """'diloco[inner_steps=8][compression=int4]' -> ('diloco', {'inner_steps': 8, 'compression': 'int4'})."""
    name, _, rest = run.partition("[")
    options = {}
    for key, value in re.findall(r"(\w+)=([^\]]+)\]", "[" + rest if rest else ""):
        options[key] = json.loads(value) if re.fullmatch(r"-?[\d.e+-]+", value) else value
    return name, options


def held_out_batch(config, tokenizer, questions: int) -> dict:
    from metastone_jax.evaluate import embedded_eval_records
    from metastone_jax.rollout import sft_batch

    # The eval split is a set of question texts that no seed's training stream draws; one set for every seed.
    records = embedded_eval_records(dataclasses.replace(config.task.arithmetic, seed=0), questions)
    return sft_batch(tokenizer, [r["question"] for r in records], [r["solution"] for r in records])


def make_held_out_loss(module):
    """params (no replica dimension), batch -> next-token cross entropy over the solutions' tokens."""
    import jax

    from metastone_jax.losses import chunked_next_token_scores, sft_loss
    from metastone_jax.models.reflective import ReflectiveModel
    from metastone_jax.step import positions_from_mask

    @jax.jit
    def loss(params, batch):
        mask = batch["attention_mask"].astype(bool)
        hidden = module.apply(
            {"params": params}, batch["tokens"], positions_from_mask(mask), mask, with_logits=False
        ).hidden
        project = lambda h: module.apply({"params": params}, h, method=ReflectiveModel.project)  # noqa: E731
        logprobs, _ = chunked_next_token_scores(hidden, project, batch["tokens"], 0)
        return sft_loss(logprobs, batch["loss_mask"])

    return loss


def train_run(run: str, overrides: list[str], steps: int, replicas: int, eval_every: int, questions: int) -> dict:
    """One SFT run; its held-out loss every `eval_every` updates and its training loss per update."""
    from metastone_jax.config_loading import load_config
    from metastone_jax.rollout import replica_params
    from metastone_jax.train import Trainer

    name, options = parse_run(run)
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(
            PRESET,
            [*SFT_ONLY, *overrides, f"sft.steps={steps}", f"mesh.data={replicas}", "mesh.fsdp=1", f"run_dir={run_dir}"]
            + [f"comm.algorithm={name}", f"comm.options={json.dumps(options)}"],
        )
        trainer = Trainer(config, Path(run_dir))
        period = options.get("inner_steps", 1)
        if eval_every % period:
            raise SystemExit(f"--eval-every={eval_every} must be a multiple of {run}'s inner_steps={period}")
        held_out = held_out_batch(config, trainer.tokenizer, questions)
        held_out_loss = make_held_out_loss(trainer.module)
        curve, train_loss = [], []

        def record(end):
            train_loss.append(end.metrics["loss"])
            if end.step % eval_every == 0:
                curve.append((end.step, float(held_out_loss(replica_params(end.state.params), held_out))))
                print(f"{run} step {end.step}: held-out {curve[-1][1]:.4f}", file=sys.stderr, flush=True)

        trainer.hooks = [record]
        trainer.train()
        trainer.checkpointer.close()
    return {"run": run, "curve": curve, "train_loss": train_loss, "period": period}


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for r in results:
        steps, losses = zip(*r["curve"])
        axes.plot(steps, losses, marker="o", markersize=3, label=r["run"])
    axes.set(xlabel="updates (equal tokens across runs)", ylabel="held-out loss of the synchronised model")
    axes.set_yscale("log")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def average_over_seeds(run: str, args) -> dict:
    """The run under seeds 0..--seeds-1 (initial parameters and training stream); curves averaged over them."""
    per_seed = [
        train_run(
            run,
            [*args.overrides, f"seed={seed}", f"task.arithmetic.seed={seed}"],
            args.steps,
            args.replicas,
            args.eval_every,
            args.held_out,
        )
        for seed in range(args.seeds)
    ]
    steps = [step for step, _ in per_seed[0]["curve"]]
    finals = [r["curve"][-1][1] for r in per_seed]
    last = [loss for r in per_seed for loss in r["train_loss"][-r["period"] :]]
    return {
        "run": run,
        "steps": args.steps,
        "held_out_loss": sum(finals) / len(finals),
        "held_out_loss_per_seed": finals,
        "train_loss_last_period": sum(last) / len(last),
        "curve": [(step, sum(r["curve"][i][1] for r in per_seed) / len(per_seed)) for i, step in enumerate(steps)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config key=value for every run, e.g. sft.learning_rate=3e-3")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="pmean first; name[option=value]...")
    parser.add_argument("--steps", type=int, default=1024, help="updates per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per run (initial parameters and data)")
    parser.add_argument("--replicas", type=int, default=4, help="fake CPU devices = mesh.data")
    parser.add_argument("--eval-every", type=int, default=128, help="updates between held-out evaluations")
    parser.add_argument("--held-out", type=int, default=128, help="eval-split questions in the held-out batch")
    parser.add_argument("--plot", help="write the held-out loss curves (means over the seeds) to this PNG")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.replicas}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = [average_over_seeds(run, args) for run in args.runs]
    for row in rows:
        row["ratio"] = row["held_out_loss"] / rows[0]["held_out_loss"]
    if args.plot:
        title = f"{args.replicas} replicas, {args.steps} updates, mean of {args.seeds} seeds"
        plot(rows, args.plot, " ".join([title, *args.overrides]))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"| run | held-out loss after {args.steps} updates (per seed) | / {rows[0]['run']}'s | train loss (last H) |")
    print("|---|---|---|---|")
    for row in rows:
        seeds = ", ".join(f"{loss:.3f}" for loss in row["held_out_loss_per_seed"])
        print(
            f"| {row['run']} | {row['held_out_loss']:.4f} ({seeds}) | {row['ratio']:.3f} | "
            f"{row['train_loss_last_period']:.4f} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
