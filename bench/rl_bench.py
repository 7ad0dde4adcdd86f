"""Our RL steps against TRL's GRPOTrainer: same model, prompts, reward and settings, CPU, alternating runs.

    python bench/rl_bench.py --model runs/tiny-sft/model --runs 3      # add --json for one JSON object

`--model` is a model exported by `python -m metastone_jax.train tiny rl.steps=0 eval.questions=0 --run-dir X`
(X/model: Hugging Face weights + tokenizer.json); without it the bench exports one first (300 SFT steps).
TRL comes from the `peers` extra: `pip install -e '.[peers]'`.

Both sides train the tiny preset's model on the embedded arithmetic task's first `8 x steps` questions in order, in
the model's prompt format, rewarded by `metastone_jax.data.reward`: 8 prompts x 4 rollouts per step, 48 new tokens,
temperature 1, lr 3e-5 (constant), KL coefficient 0.001 (k3, token mean), entropy bonus 0.001, PPO clip 0.2,
group-std advantages, gradient clipping at 1, float32, torch on 2 threads. Ours is the main job
(`python -m metastone_jax.train tiny sft.steps=0 rl.steps=N model.pretrained=...`) and also trains the SPRM head
(SPR loss) and writes a checkpoint and the exported model at the end; TRL trains the policy alone.

Every run is a fresh process; runs alternate (ours, TRL, ours, ...) so that both see the same machine load. Ours'
persistent compilation cache starts empty, so its first run compiles and the later ones load from the cache.
Per run: median seconds per step over steps 4..N (each side's own clock around a whole step: sampling, rewards,
reference and policy passes, update), generated tokens/s over those steps, JAX compile seconds (tracing, lowering,
XLA or cache loads; TRL runs eagerly) and the whole process's wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS_PER_STEP, GROUP_SIZE, NEW_TOKENS = 8, 4, 48
LEARNING_RATE, KL_COEF, ENTROPY_COEF, TEMPERATURE = 3e-5, 0.001, 0.001, 1.0
TIMED_FROM_STEP = 4  # steps before it warm up (compilation, allocator) and are left out of the medians
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


# ------------------------------------------------------------------------------------------- the workers


def run_ours(model: str, steps: int, run_dir: Path, seed: int, extra_overrides: list[str]) -> dict:
    """The main job on the RL phase alone; per-step figures from its metrics.jsonl."""
    import jax

    compile_seconds, compilations = [0.0], [0]

    def on_duration(event: str, seconds: float, **_) -> None:
        if event in COMPILE_EVENTS:
            compile_seconds[0] += seconds
        compilations[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    from metastone_jax.train import main

    overrides = ["sft.steps=0", f"rl.steps={steps}", f"model.pretrained={model}", "eval.questions=0", f"seed={seed}"]
    if main(["tiny", *overrides, *extra_overrides, "--run-dir", str(run_dir)]) != 0:
        raise SystemExit("our run failed")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": [m["step_s"] for m in metrics],
        "generated_tokens": [m["response_tokens"] * PROMPTS_PER_STEP * GROUP_SIZE for m in metrics],
        "reward": [m["reward"] for m in metrics],
        "compile_s": compile_seconds[0],
        "compilations": compilations[0],
    }


def _our_reward():
    """`metastone_jax.data.reward` without the package's __init__, which imports JAX: TRL's process should not pay
    for JAX's import."""
    for name, path in (("metastone_jax", REPO / "metastone_jax"), ("metastone_jax.data", REPO / "metastone_jax/data")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from metastone_jax.data.verify import reward

    return reward


def run_trl(model: str, steps: int, run_dir: Path, seed: int, questions: list[dict]) -> dict:
    """TRL's GRPOTrainer configured like our RL step; per-step figures from a callback."""
    import torch

    torch.set_num_threads(2)
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    reward = _our_reward()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(model) / "tokenizer.json"), eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    policy = Qwen2ForCausalLM.from_pretrained(model, dtype=torch.float32)

    def rewards(completions, answer, **_):
        return [reward(text, reference) for text, reference in zip(completions, answer)]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_s, self.generated_tokens, self.reward = [], [], []

        def on_step_begin(self, args, state, control, **_):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **_):
            self.step_s.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "completions/mean_length" in logs:
                self.generated_tokens.append(logs["completions/mean_length"] * PROMPTS_PER_STEP * GROUP_SIZE)
                self.reward.append(logs["reward"])

    config = GRPOConfig(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,  # one step = one generation batch
        gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE,
        max_completion_length=NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        beta=KL_COEF,
        entropy_coef=ENTROPY_COEF,
        epsilon=0.2,
        loss_type="dapo",  # token mean over the batch, as ours
        scale_rewards="group",  # (r - group mean) / (group std + eps), as ours
        max_grad_norm=1.0,
        shuffle_dataset=False,  # the questions in our order
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    dataset = Dataset.from_list(questions)
    clock = StepClock()
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=rewards,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    return {
        "step_s": clock.step_s,
        "generated_tokens": clock.generated_tokens,
        "reward": clock.reward,
        "compile_s": 0.0,
        "compilations": 0,
    }


# ------------------------------------------------------------------------------------------- the driver


def export_model(workdir: Path) -> str:
    run_dir = workdir / "export" / "sft"
    print(f"exporting a tiny model (300 SFT steps) to {run_dir}/model", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "metastone_jax.train", "tiny", "rl.steps=0", "eval.questions=0"]
    subprocess.run([*command, "--run-dir", str(run_dir)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return str(run_dir / "model")


def task_questions(model: str, count: int) -> list[dict]:
    """The first `count` questions of the tiny preset's task as our RL phase renders them: in its order, in the
    model's prompt format, with the task's instruction."""
    from metastone_jax.config_loading import load_config
    from metastone_jax.data import TextTokenizer

    config = load_config("tiny")
    prompt_format = TextTokenizer.from_file(model).prompt_format
    samples = [config.task.arithmetic.sample(i) for i in range(count)]
    return [
        {"prompt": prompt_format.render(s["question"], config.task.instruction), "answer": s["answer"]} for s in samples
    ]


def one_run(side: str, args, workdir: Path, index: int) -> dict:
    """Runs one side in a fresh process; its figures plus the process's wall time."""
    out = workdir / f"{side}-{index}.json"
    command = [sys.executable, __file__, "--worker", side, "--model", args.model, "--steps", str(args.steps)]
    command += ["--seed", str(args.seed), "--workdir", str(workdir), "--out", str(out), "--index", str(index)]
    command += [f"--override={override}" for override in args.override]
    # torch's OpenMP threads spin while they wait; on a loaded machine that costs TRL up to 10x (BENCHMARKS.md).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    started = time.perf_counter()
    with open(workdir / f"{side}-{index}.log", "w") as log:
        subprocess.run(command, check=True, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {**json.loads(out.read_text()), "process_s": time.perf_counter() - started}


def summarize(run: dict, steps: int) -> dict:
    timed = slice(TIMED_FROM_STEP - 1, steps)
    seconds = run["step_s"][timed]
    return {
        "median_step_s": statistics.median(seconds),
        "tokens_per_s": sum(run["generated_tokens"][timed]) / sum(seconds),
        "first_step_s": run["step_s"][0],
        "compile_s": run["compile_s"],
        "compilations": run["compilations"],
        "process_s": run["process_s"],
        "mean_reward": statistics.fmean(run["reward"]),
    }


def table(result: dict) -> str:
    ours, trl = result["ours"], result["trl"]

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    cold, warm = ours[0], ours[1:] or ours
    rows = [
        ("median s/step (steps 4-N, median of runs)", median(ours, "median_step_s"), median(trl, "median_step_s")),
        ("generated tokens/s", median(ours, "tokens_per_s"), median(trl, "tokens_per_s")),
        ("first step s, cold cache", cold["first_step_s"], median(trl, "first_step_s")),
        ("first step s, warm cache", median(warm, "first_step_s"), median(trl, "first_step_s")),
        ("compile s (trace + lower + XLA), cold cache", cold["compile_s"], 0.0),
        ("compile s, warm cache (cache loads)", median(warm, "compile_s"), 0.0),
        ("whole process s, cold cache", cold["process_s"], median(trl, "process_s")),
        ("whole process s, warm cache", median(warm, "process_s"), median(trl, "process_s")),
        ("mean reward over the steps", median(ours, "mean_reward"), median(trl, "mean_reward")),
    ]
    lines = ["| | ours | TRL | ours / TRL |", "|---|---|---|---|"]
    for name, a, b in rows:
        ratio = f"{a / b:.2f}" if b else ""
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported model directory (default: export one first)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where runs, logs and ours' compilation cache go (default: a temp dir)")
    parser.add_argument(
        "--override", action="append", default=[], help="a key=value override of our runs, e.g. model.scan_layers=false"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < TIMED_FROM_STEP:
        parser.error(f"--steps must be at least {TIMED_FROM_STEP}: the medians start at step {TIMED_FROM_STEP}")

    if args.worker:
        workdir = Path(args.workdir)
        run_dir = workdir / "runs" / f"{args.worker}-{args.index}"
        if args.worker == "ours":
            result = run_ours(args.model, args.steps, run_dir, args.seed, args.override)
        else:
            questions = json.loads((workdir / "questions.json").read_text())
            result = run_trl(args.model, args.steps, run_dir, args.seed, questions)
        Path(args.out).write_text(json.dumps(result))
        return 0

    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed: pip install -e '.[peers]' (TRL's GRPOTrainer is the peer)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rl_bench-"))
    shutil.rmtree(workdir / "runs", ignore_errors=True)  # ours' compilation cache too: the first run is cold
    workdir.mkdir(parents=True, exist_ok=True)
    args.model = str(Path(args.model).absolute()) if args.model else export_model(workdir)
    (workdir / "questions.json").write_text(json.dumps(task_questions(args.model, PROMPTS_PER_STEP * args.steps)))

    result = {"ours": [], "trl": []}
    for index in range(args.runs):
        for side in ("ours", "trl"):
            run = summarize(one_run(side, args, workdir, index), args.steps)
            result[side].append(run)
            print(f"run {index + 1}/{args.runs} {side}: {json.dumps(run)}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"steps": args.steps, "runs": args.runs, **result}))
    else:
        print(f"{args.runs} alternating runs of {args.steps} steps each, {PROMPTS_PER_STEP} prompts x {GROUP_SIZE}")
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
