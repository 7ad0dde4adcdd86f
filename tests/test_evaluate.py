"""`python -m metastone_jax.evaluate` end to end on a tiny random model, and its messages for bad input."""

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
from metastone_jax.data import ArithmeticTask, build_arithmetic_tokenizer
from metastone_jax.evaluate import benchmark_metrics, main


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
    assert "sprm@k" in table and "medium" in table and "SPRM AUROC" in table
    metrics = json.loads((out / "eval.json").read_text())
    for key in ("pass@1", "maj@2", "sprm@2", "oracle@2", "maj@8", "sprm@8", "oracle@8", "auroc"):
        assert key in metrics
    assert set(metrics["modes"]) == {"low", "medium"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8
    assert {"response", "answer", "correct", "step_scores", "score"} <= set(samples[0])
    assert (out / "scaling.png").stat().st_size > 1000
    # The aggregate equals the tts metrics recomputed from the samples the run wrote.
    by_question = [samples[i : i + 8] for i in range(0, 24, 8)]
    expected = np.mean([tts.sprm_best_of_k([s["score"] for s in q], [s["correct"] for s in q], 8) for q in by_question])
    assert metrics["sprm@8"] == pytest.approx(expected)


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


def test_compute_per_mode_is_parameters_times_tokens():
    samples = [
        {"score": s, "correct": c, "answer": a, "tokens": t}
        for s, c, a, t in [(0.9, True, "1", 10), (0.1, False, "2", 30), (0.5, True, "1", 20), (0.2, False, "3", 20)]
    ]
    metrics = benchmark_metrics(samples, 4, {"low": 2}, num_params=1000)
    assert metrics["modes"]["low"]["compute"] == 1000 * 2 * 20.0
    assert metrics["sprm@2"] == 1.0 and metrics["pass@1"] == 0.5


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
