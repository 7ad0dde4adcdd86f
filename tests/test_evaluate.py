"""`python -m metastone_jax.evaluate` end to end on a tiny random model, its metrics and outputs on hand-made samples,
the held-out evaluation questions, and its messages for bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers

import metastone_jax as ms
from metastone_jax import tts
from metastone_jax.config_loading import load_config
from metastone_jax.data import ArithmeticTask, arithmetic_dataset, build_arithmetic_tokenizer
from metastone_jax.evaluate import EvalResult, benchmark_metrics, embedded_eval_records, main, write_outputs
from tests.test_tts import reference_auroc, reference_weighted_vote, reference_within_question_auroc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = build_arithmetic_tokenizer(ArithmeticTask())
    config = ms.Qwen2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    module = ms.ReflectiveModel(config)
    ms.save_hf(ms.Model(module, ms.init_params(module, jax.random.key(0))), path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_end_to_end_writes_table_jsonl_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            str(model_dir),
            "eval.questions=3",
            "eval.modes=[low, medium]",
            "eval.samples=8",
            "sampling.max_new_tokens=8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "wmaj@k" in table and "medium" in table and "SPRM AUROC: within-question" in table and "pooled" in table
    metrics = json.loads((out / "eval.json").read_text())
    for key in ("pass@1", "auroc_within", "auroc_within_questions", "auroc_pooled", "step_auroc", "steps_checked"):
        assert key in metrics
    assert {f"{method}@{k}" for method in tts.METHODS for k in (2, 8)} <= set(metrics)
    assert set(metrics["modes"]) == {"low", "medium"}
    assert {"wmaj@8", "auroc_within", "step_auroc"} <= set(metrics["modes"]["medium"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8
    assert {"response", "answer", "correct", "step_scores", "step_correct", "score", "finished"} <= set(samples[0])
    assert (out / "scaling.png").stat().st_size > 1000
    # Embedded questions get their steps checked, one verdict per scored step.
    assert all(s["step_correct"] is None or len(s["step_correct"]) == len(s["step_scores"]) for s in samples)
    assert metrics["steps_checked"] == sum(len(s["step_correct"] or []) for s in samples)
    # The aggregate equals the tts metrics recomputed from the samples the run wrote.
    by_question = [samples[i : i + 8] for i in range(0, 24, 8)]
    expected = np.mean([tts.sprm_best_of_k([s["score"] for s in q], [s["correct"] for s in q], 8) for q in by_question])
    assert metrics["sprm@8"] == pytest.approx(expected)
    expected = np.mean(
        [
            reference_weighted_vote([s["answer"] for s in q], [s["correct"] for s in q], [s["score"] for s in q], 8)
            for q in by_question
        ]
    )
    assert metrics["wmaj@8"] == pytest.approx(expected)


def test_k_larger_than_n_is_refused(model_dir, capsys):
    assert main([str(model_dir), "eval.questions=1", "eval.modes=[high]", "eval.samples=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "k=32" in err and "samples=8" in err


def test_missing_head_is_refused(model_dir, tmp_path, capsys):
    for file in model_dir.iterdir():
        if file.name != "score_module.pt" and file.is_file():
            (tmp_path / file.name).write_bytes(file.read_bytes())
    assert main([str(tmp_path), "eval.questions=1", "eval.modes=[low]"]) == 2
    assert "no SPRM head" in capsys.readouterr().err


def test_tokenizer_without_the_delimiter_is_refused(model_dir, tmp_path, capsys):
    vocab = {"<pad>": 0, "<eos>": 1, "a": 2}
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    bare.save(str(tmp_path / "tokenizer.json"))
    assert main([str(model_dir), f"model.tokenizer={tmp_path / 'tokenizer.json'}", "eval.modes=[low]"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def _sample(score, correct, answer, tokens=20, step_scores=(), step_correct=None, finished=True):
    return {
        "score": score,
        "correct": correct,
        "answer": answer,
        "tokens": tokens,
        "step_scores": list(step_scores),
        "step_correct": step_correct,
        "finished": finished,
    }


def test_compute_per_mode_is_parameters_times_tokens():
    samples = [
        _sample(s, c, a, t)
        for s, c, a, t in [(0.9, True, "1", 10), (0.1, False, "2", 30), (0.5, True, "1", 20), (0.2, False, "3", 20)]
    ]
    metrics = benchmark_metrics(samples, 4, {"low": 2}, num_params=1000)
    assert metrics["modes"]["low"]["compute"] == 1000 * 2 * 20.0
    assert metrics["sprm@2"] == 1.0 and metrics["pass@1"] == 0.5


# Two questions of four samples: question 0 has right and wrong samples, question 1 only wrong ones; a sample
# without steps, one without an answer, one cut off before EOS, one whose steps were not checked.
HAND_SAMPLES = [
    _sample(0.8, True, "6", step_scores=[0.9, 0.7], step_correct=[True, True]),
    _sample(0.3, False, "7", step_scores=[0.6, 0.15], step_correct=[True, False]),
    _sample(0.0, False, "7"),
    _sample(0.25, True, "6", step_scores=[0.4], step_correct=[True]),
    _sample(0.6, False, "1", step_scores=[0.6], step_correct=[False]),
    _sample(0.5, False, None, step_scores=[0.5], step_correct=[False], finished=False),
    _sample(0.7, False, "2", step_scores=[0.7], step_correct=None),
    _sample(0.2, False, "2", step_scores=[0.2, 0.05], step_correct=[True, False]),
]


def test_benchmark_metrics_on_hand_made_samples_equal_independent_references():
    metrics = benchmark_metrics(HAND_SAMPLES, 4, {"low": 2, "k=4": 4}, num_params=10)
    scores = [[s["score"] for s in HAND_SAMPLES[:4]], [s["score"] for s in HAND_SAMPLES[4:]]]
    correct = [[s["correct"] for s in HAND_SAMPLES[:4]], [s["correct"] for s in HAND_SAMPLES[4:]]]
    answers = [[s["answer"] for s in HAND_SAMPLES[:4]], [s["answer"] for s in HAND_SAMPLES[4:]]]
    for k in (2, 4):
        expected = np.mean([reference_weighted_vote(a, c, s, k) for s, c, a in zip(scores, correct, answers)])
        assert metrics[f"wmaj@{k}"] == pytest.approx(expected)
    # Question 0 at k=4: "7" sums 0.3 < "6" 1.05 -> right; question 1: "2" sums 0.9 > "1" 0.6 -> wrong.
    assert metrics["wmaj@4"] == 0.5
    within, count = reference_within_question_auroc(scores, correct)
    assert metrics["auroc_within"] == pytest.approx(within) == 0.75 and metrics["auroc_within_questions"] == count == 1
    assert metrics["auroc_pooled"] == pytest.approx(reference_auroc(sum(scores, []), sum(correct, [])))
    checked = [(x, y) for s in HAND_SAMPLES if s["step_correct"] for x, y in zip(s["step_scores"], s["step_correct"])]
    assert metrics["steps_checked"] == len(checked) == 9
    assert metrics["step_auroc"] == pytest.approx(reference_auroc(*zip(*checked)))
    assert metrics["finished"] == 7 / 8
    for mode, k in (("low", 2), ("k=4", 4)):
        row = metrics["modes"][mode]
        assert row["wmaj@" + str(k)] == metrics[f"wmaj@{k}"] and row["auroc_within"] == metrics["auroc_within"]


def test_outputs_hold_strict_json_and_a_calibration_plot_when_steps_were_checked(tmp_path):
    metrics = benchmark_metrics(HAND_SAMPLES, 4, {"low": 2}, num_params=10)
    paths = write_outputs(EvalResult(metrics, HAND_SAMPLES), tmp_path / "checked")
    assert [p.name for p in paths] == ["eval.json", "samples.jsonl", "scaling.png", "calibration.png"]
    assert (tmp_path / "checked" / "calibration.png").stat().st_size > 1000
    written = json.loads((tmp_path / "checked" / "eval.json").read_text(), parse_constant=pytest.fail)
    assert None in written["step_calibration"]["mean_score"]  # an empty bin is null, not NaN
    unchecked = [dict(s, step_correct=None, correct=False) for s in HAND_SAMPLES]
    metrics = benchmark_metrics(unchecked, 4, {"low": 2}, num_params=10)
    paths = write_outputs(EvalResult(metrics, unchecked), tmp_path / "unchecked")
    assert "calibration.png" not in [p.name for p in paths]
    written = json.loads((tmp_path / "unchecked" / "eval.json").read_text(), parse_constant=pytest.fail)
    assert written["auroc_within"] is None and written["step_auroc"] is None and written["steps_checked"] == 0


def test_evaluation_questions_are_never_among_the_default_runs_training_questions():
    """The default run trains on the first sft.steps x sft.batch_size (and rl.steps x rl.prompts_per_step) problems
    of the task's stream; its evaluation questions come from the held-out split and are none of them."""
    config = load_config(None)
    task = config.task.arithmetic
    drawn = max(config.sft.steps * config.sft.batch_size, config.rl.steps * config.rl.prompts_per_step)
    batches = iter(arithmetic_dataset(task, config.sft.batch_size, shard_index=0, shard_count=1))
    trained = {q for _ in range(-(-drawn // config.sft.batch_size)) for q in next(batches)["question"]}
    evaluated = [record["question"] for record in embedded_eval_records(task, 4 * config.eval.questions)]
    assert len(trained) > 5000 and len(set(evaluated)) == len(evaluated) == 4 * config.eval.questions
    assert not trained.intersection(evaluated)


def test_a_task_with_too_few_held_out_questions_is_refused():
    # 81 one-step sums, of which the hash holds out 9 (counted here by the definition, SHA-256 mod 16).
    held_out = {
        f"{a} + {b}"
        for a in range(1, 10)
        for b in range(1, 10)
        if int.from_bytes(hashlib.sha256(f"{a} + {b}".encode()).digest()[:8], "big") % 16 == 0
    }
    task = ArithmeticTask(num_steps=(1, 1), operators=("+",))
    assert {r["question"] for r in embedded_eval_records(task, len(held_out))} == held_out
    with pytest.raises(ValueError, match=f"only {len(held_out)} distinct questions, fewer than the 20"):
        embedded_eval_records(task, 20)


@pytest.mark.slow  # test_train.py runs the launcher with two processes in the default run
def test_two_processes_through_the_launcher_evaluate_like_one_process_with_two_devices(model_dir, tmp_path):
    repo = Path(__file__).parents[1]
    evaluate = [
        "metastone_jax.evaluate",
        str(model_dir),
        "eval.questions=3",
        "eval.modes=[low]",
        "eval.samples=4",
        "sampling.max_new_tokens=8",
        "--out",
    ]
    single = subprocess.run(
        [sys.executable, "-m", *evaluate, str(tmp_path / "one")],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    launched = subprocess.run(
        [sys.executable, "-m", "launch.local_cluster", "--num-processes", "2", "--", *evaluate, str(tmp_path / "two")],
        cwd=repo,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:]
    assert "[0] mode" in launched.stdout and "[1] mode" not in launched.stdout  # the first process reports
    for name in ("eval.json", "samples.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
