"""What checking answers costs per rollout batch: the default run's responses and 256 MATH-style ones.

Times `data.rewards` (extraction and comparison, math-verify in its worker processes) on a batch, with fresh workers
whose parse caches are empty (started and warmed before the clock starts, as they are after a run's first batch):
wall seconds, and CPU seconds of this process and the workers, which a loaded machine inflates far less.
The default run's responses come from a run's samples.jsonl (`--samples`, written by its evaluation), the
MATH-style ones are written here: R1-style reasoning with LaTeX, then a boxed, a "final answer is" or no answer,
against references of every kind (numbers, fractions, radicals, sets, intervals, tuples, percentages, letters,
expressions). With `--metrics` (a run's metrics.jsonl) the figures are set against its median RL step time.

    .venv/bin/python bench/verify_bench.py --samples runs/X/samples.jsonl --metrics runs/X/metrics.jsonl [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from metastone_jax.data import verify
from metastone_jax.data.verify_worker import WorkerPool

# (reference, an equivalent way a model writes it, a wrong look-alike)
MATH_ANSWERS = [
    ("204", "204", "240"),
    ("\\frac{3}{4}", "0.75", "\\frac{4}{3}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}", "2\\sqrt{3}"),
    ("\\{1,2,3\\}", "\\{3, 2, 1\\}", "\\{1,2\\}"),
    ("[0,1)", "[0, 1)", "(0,1]"),
    ("(3,-4)", "\\left(3, -4\\right)", "(-4,3)"),
    ("10\\%", "0.1", "1\\%"),
    ("\\text{(B)}", "B", "C"),
    ("x^2+2x+1", "(x+1)^2", "x^2+1"),
    ("\\frac{\\pi}{6}", "\\pi/6", "\\frac{\\pi}{3}"),
    ("-\\infty", "-\\infty", "\\infty"),
    ("1,234", "1234", "1243"),
    ("e^{2}", "e^2", "2e"),
    ("\\dfrac{7}{12}", "\\frac{14}{24}", "\\frac{7}{13}"),
    ("5\\text{ cm}", "5", "6"),
]
REASONING = [
    "Let me set up the equation carefully. We have $x^2 - 5x + 6 = 0$, which factors as $(x-2)(x-3) = 0$.",
    "Wait, I should double-check the case $n = 3$: then $\\binom{6}{3} = 20$ and the sum is $\\frac{20}{2} = 10$.",
    "Using the identity $\\sin^2\\theta + \\cos^2\\theta = 1$, we substitute and simplify the expression step by step.",
    "So the area is $\\frac{1}{2} \\cdot 8 \\cdot 6 = 24$, and the perimeter is $8 + 6 + 10 = 24$ as well.",
    "Hmm, that contradicts the earlier result; let me recompute $\\sqrt{49 + 576} = \\sqrt{625} = 25$.",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", help="a run's samples.jsonl: its responses make the default run's batch")
    parser.add_argument("--metrics", help="a run's metrics.jsonl: its median RL step_s is the yardstick")
    parser.add_argument("--rollouts", type=int, default=32, help="the run's batch: 8 prompts x 4 rollouts by default")
    parser.add_argument("--math", type=int, default=256, help="MATH-style responses (0: none)")
    parser.add_argument("--workers", type=int, action="append", help="worker counts to time (default 1 and 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches, each on fresh workers; best kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def math_style_batch(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`count` long R1-style responses and their references; a third right, a third wrong look-alikes, the rest
    stated without a box or cut off before </think>."""
    rng = random.Random(seed)
    responses, references = [], []
    for index in range(count):
        reference, equivalent, wrong = MATH_ANSWERS[index % len(MATH_ANSWERS)]
        reasoning = "\n\n".join(rng.choice(REASONING) for _ in range(rng.randint(8, 24)))
        kind = index % 4
        if kind == 0:
            response = f"{reasoning}\n</think>\n\nTherefore the answer is $\\boxed{{{equivalent}}}$."
        elif kind == 1:
            response = f"{reasoning}\n</think>\n\nTherefore the answer is $\\boxed{{{wrong}}}$."
        elif kind == 2:
            response = f"{reasoning}\n</think>\n\nThe final answer is ${equivalent}$. I hope it is correct."
        else:
            response = reasoning  # ran out of tokens while thinking
        responses.append(response)
        references.append(reference)
    return responses, references


def default_run_batch(path: str, rollouts: int) -> tuple[list[str], list[str]]:
    with open(path) as file:
        samples = [json.loads(line) for line in file][:rollouts]
    return [s["response"] for s in samples], [s["reference"] for s in samples]


def time_rewards(responses: list[str], references: list[str], workers: int, repeats: int) -> dict:
    """Best wall seconds of `rewards` over `repeats` batches on fresh, warmed workers, the CPU seconds it took (this
    process and the workers: what a loaded machine does not inflate), and how many requests needed a worker."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        verify._pool = WorkerPool(size=workers)
        verify._pool.run([("equal", "\\frac{1}{2}", "0.5")] * workers, deadline_s=60.0)
        cpu, wall = time.process_time() + worker_cpu_seconds(), time.perf_counter()
        verify.rewards(responses, references)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() + worker_cpu_seconds() - cpu)
        verify._pool.close()
    extract_requests = sum(verify._extract_locally(r) is verify._ASK_MATH_VERIFY for r in responses)
    answers = verify.extract_answers(responses)
    equal_requests = sum(verify._compare_locally(a, r) is verify._ASK_MATH_VERIFY for a, r in zip(answers, references))
    return {"seconds": best_wall, "cpu_seconds": best_cpu, "worker_requests": extract_requests + equal_requests}


def worker_cpu_seconds() -> float:
    """User + system CPU time of the running workers (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for worker in verify._pool._workers:
        if worker._process is not None:
            with open(f"/proc/{worker._process.pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def main() -> None:
    args = parse_args()
    batches = {"run": default_run_batch(args.samples, args.rollouts)} if args.samples else {}
    if args.math:
        batches["math_style"] = math_style_batch(args.math)
    step_s = None
    if args.metrics:
        with open(args.metrics) as file:
            steps = [json.loads(line) for line in file]
        step_s = statistics.median(s["step_s"] for s in steps if s.get("phase") == "rl")  # compiling steps aside
    results = {"rl_step_s": step_s, "batches": {}}
    for name, (responses, references) in batches.items():
        for workers in args.workers or [1, 2]:
            timing = time_rewards(responses, references, workers, args.repeats)
            timing["responses"] = len(responses)
            if step_s:
                timing["fraction_of_rl_step"] = timing["seconds"] / step_s
            results["batches"][f"{name}/{workers}_workers"] = timing
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if step_s:
        print(f"median RL step of the run: {step_s:.3f} s")
    header = ("responses", "to workers", "wall s", "CPU s", "CPU ms/resp", "of step")
    print(f"{'batch':<26} " + " ".join(f"{name:>{max(len(name), 7)}}" for name in header))
    for name, timing in results["batches"].items():
        fraction = f"{timing['fraction_of_rl_step']:.1%}" if step_s else "-"
        print(
            f"{name:<26} {timing['responses']:>9} {timing['worker_requests']:>10} {timing['seconds']:>7.3f} "
            f"{timing['cpu_seconds']:>7.3f} {1e3 * timing['cpu_seconds'] / timing['responses']:>11.2f} {fraction:>7}"
        )


if __name__ == "__main__":
    main()
