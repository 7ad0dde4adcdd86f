"""Does the SPRM rank a question's samples as well as the policy's own likelihood of them?

Re-scores a run's evaluation samples (its `samples.jsonl`, written by the main job) with two rankers that need no
training, and sets them beside the SPRM's trajectory score:
- `likelihood`: the policy's geometric-mean probability of the response's tokens, exp(mean log p);
- `result likelihood`: the same over the step results only, the token after each ` =` of an `a op b = c` step
  (the embedded task's steps; a response without one gets 0).
The probabilities come from the run's exported model (`RUN/model`) in transformers, on the prompt as the sampler
encoded it (the run's tokenizer and prompt format), at temperature 1. Printed per run: within-question AUROC (and the
number of questions with right and wrong samples), pass@1, best-of-k, maj@32 and the weighted vote (`tts`).

    .venv/bin/python bench/sprm_ranking.py runs/X [runs/Y ...] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from metastone_jax import tts
from metastone_jax.data.tokenizer import TextTokenizer

COLUMNS = ("auroc_within", "pass@1", "sprm@8", "sprm@32", "maj@32", "wmaj@32")


def response_log_probs(model, prompt: list[int], response: list[int]) -> np.ndarray:
    """[len(response)] log p of each response token given the prompt and the response before it."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return log_probs.gather(1, ids[0, 1:, None])[len(prompt) - 1 :, 0].numpy()


def rank_run(run: str) -> dict[str, dict[str, float]]:
    """{ranker: tts.evaluate_benchmark metrics} for the samples of one run."""
    model = AutoModelForCausalLM.from_pretrained(os.path.join(run, "model")).eval()
    tokenizer = TextTokenizer.from_file(os.path.join(run, "model"))
    equals = tokenizer.token_to_id(" =")
    questions = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(os.path.join(run, "samples.jsonl"), encoding="utf-8") as file:
        for line in file:
            sample = json.loads(line)
            prompt = tokenizer.encode(tokenizer.prompt_format.render(sample["question"]))
            response = tokenizer.encode(sample["response"])
            log_probs = response_log_probs(model, prompt, response)
            results = [lp for token, lp in zip(response, log_probs[1:]) if token == equals]
            question = questions[sample["question_index"]]
            question["SPRM"].append(sample["score"])
            question["likelihood"].append(float(np.exp(log_probs.mean())))
            question["result likelihood"].append(float(np.exp(np.mean(results))) if results else 0.0)
            question["correct"].append(sample["correct"])
            question["answer"].append(sample["answer"])
    order = sorted(questions)
    return {
        ranker: tts.evaluate_benchmark(
            [questions[q][ranker] for q in order],
            [questions[q]["correct"] for q in order],
            [questions[q]["answer"] for q in order],
        )
        for ranker in ("SPRM", "likelihood", "result likelihood")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories with samples.jsonl and model/")
    parser.add_argument("--json", action="store_true", help="one JSON object per run and ranker")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.json:
        print(f"{'run':<24} {'ranker':<18} {'within AUROC':>14} " + " ".join(f"{c:>8}" for c in COLUMNS[1:]))
    for run in args.runs:
        for ranker, m in rank_run(run).items():
            if args.json:
                print(
                    json.dumps(
                        {"run": run, "ranker": ranker, **{c: m[c] for c in COLUMNS + ("auroc_within_questions",)}}
                    )
                )
            else:
                within = f"{m['auroc_within']:.3f} ({m['auroc_within_questions']})"
                name = os.path.basename(os.path.normpath(run))
                print(f"{name:<24} {ranker:<18} {within:>14} " + " ".join(f"{m[c]:>8.3f}" for c in COLUMNS[1:]))


if __name__ == "__main__":
    main()
