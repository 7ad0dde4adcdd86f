"""The main job end to end on tiny configs: phases, comms algorithms, metrics, exact resume after a real kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from metastone_jax import train
from metastone_jax.config_loading import load_config
from metastone_jax.data import ArithmeticTask, build_arithmetic_tokenizer
from metastone_jax.models.reflective import HEAD
from metastone_jax.train import Trainer, main

PRESET = "micro"  # configs/micro.yaml: the tiny preset at width 32 and 2 layers
TINY = [
    "rl.prompts_per_step=4",
    "rl.group_size=2",
    "sampling.max_new_tokens=12",
    "eval.questions=2",
    "eval.samples=2",
    "eval.modes=[low]",
    "checkpoint.async_save=false",
]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "algorithm,options",
    # 1-bit Adam warms up for 4 updates in each phase (SFT, then RL with a fresh optimizer): the loop passes
    # the phase of each update, so RL's first update must be a warm-up one, or its zero second moment blows up.
    [pytest.param("onebit_adam", "{warmup_steps: 4}", marks=pytest.mark.slow), ("decentralized", "{}")],
)
def test_trains_with_a_comms_algorithm_on_4_replicas(tmp_path, algorithm, options):
    config = load_config(
        PRESET,
        TINY
        + [
            "mesh.data=4",
            "mesh.fsdp=2",
            "sft.steps=12",
            "rl.steps=2",
            f"comm.algorithm={algorithm}",
            f"comm.options={options}",
            f"run_dir={tmp_path}",
        ],
    )
    trainer = Trainer(config, tmp_path)
    trainer.run()
    sft_losses = [m["loss"] for m in _metrics(tmp_path) if m["phase"] == "sft"]
    assert np.mean(sft_losses[-3:]) < np.mean(sft_losses[:3]) - 0.3
    rl = [m for m in _metrics(tmp_path) if m["phase"] == "rl"]
    assert len(rl) == 2 and all(np.isfinite(m["loss"]) for m in rl)
    # One RL update at lr 3e-5 leaves the policy next to its reference (a wrong 1-bit Adam phase gives KL ~1.5).
    assert rl[-1]["kl"] < 1e-2, rl[-1]
    params = jax.tree.leaves(trainer.state.params)
    identical = all(np.array_equal(np.asarray(p)[0], np.asarray(p)[r]) for p in params for r in range(1, 4))
    # Centralized algorithms keep replicas bit-identical; decentralized gossip lets them differ.
    assert identical == (algorithm == "onebit_adam")
    assert {"eval.json", "samples.jsonl", "scaling.png", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "model" / "score_module.pt").exists()


def test_bad_config_key_stops_with_its_name(capsys, tmp_path):
    assert main(["rl.stepz=3", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rl.stepz" in err and "steps" in err


def test_malformed_data_line_stops_with_one_error_line_naming_file_and_line(capsys, tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    build_arithmetic_tokenizer(ArithmeticTask()).save(str(tokenizer))
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1 + 2", "answer": "3"}\n{"question": "2 + 2", "answer": \n')
    code = main([f"task.files=[{data}]", f"model.tokenizer={tokenizer}", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and f"{data}, line 2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


RESUME_ARGS = [PRESET, *TINY, "sft.steps=6", "rl.steps=4", "checkpoint.every=2", "eval.questions=0"]


def _launch(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen(
        [sys.executable, "-m", "metastone_jax.train", *RESUME_ARGS, "mesh.data=2", "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parents[1],
    )


@pytest.mark.timeout(900)
def test_killed_run_resumes_with_the_same_metrics(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = _launch(straight)
    victim = _launch(killed)
    # Kill (SIGKILL, no clean-up) once the RL phase has checkpointed step 8.
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "8").exists():
        assert victim.poll() is None, victim.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert first.wait(timeout=600) == 0, first.stdout.read().decode()[-3000:]
    resumed = _launch(killed)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from the checkpoint of step" in output
    assert (killed / "config.yaml").exists()
    drop = ("step_s", "tokens_per_s")
    expected = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(straight)]
    got = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(killed)]
    assert [m["step"] for m in got] == list(range(1, 11))
    assert got == expected


def test_onebit_gradients_under_adamw_warn_and_name_onebit_adam(tmp_path):
    config = load_config(PRESET, TINY + ["mesh.data=2", "comm.algorithm=onebit", f"run_dir={tmp_path}"])
    with pytest.warns(UserWarning, match="onebit_adam"):
        trainer = Trainer(config, tmp_path)
    trainer.checkpointer.close()


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_the_sft_learning_rate_warms_up_linearly_then_stays_or_follows_a_cosine_to_zero(decay):
    peak, warmup, steps = 3e-3, 10, 110
    sft = load_config(
        None, [f"sft.learning_rate={peak}", f"sft.warmup_steps={warmup}", f"sft.steps={steps}", f"sft.decay={decay}"]
    ).sft
    t = np.array([0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110])
    after = np.clip((t - warmup) / (steps - warmup), 0, 1)
    decayed = 0.5 * (1 + np.cos(np.pi * after)) if decay == "cosine" else np.ones_like(after)
    want = np.where(t < warmup, peak * t / warmup, peak * decayed)
    got = np.array([train.sft_schedule(sft)(int(i)) for i in t])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=peak * 1e-6)  # float32 near 0
    assert decay == "constant" or (got[-1] == 0 and got[7] == pytest.approx(peak / 2))


def test_the_head_warmup_trains_the_head_and_leaves_the_policy_where_it_started(tmp_path):
    overrides = ["sft.steps=0", "rl.steps=2", "rl.head_warmup_steps=2", "eval.questions=0", f"run_dir={tmp_path}"]
    trainer = Trainer(load_config(PRESET, TINY + overrides), tmp_path)
    start = jax.tree.map(np.asarray, trainer.initial_params())
    trainer.run()
    end = jax.tree.map(lambda p: np.asarray(p)[0], trainer.state.params)
    for path, want in jax.tree_util.tree_leaves_with_path({k: v for k, v in start.items() if k != HEAD}):
        np.testing.assert_array_equal(loaded_leaf(end, path), want, err_msg=jax.tree_util.keystr(path))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start[HEAD]), jax.tree.leaves(end[HEAD])))


def test_a_run_continues_from_the_model_a_previous_run_exported(tmp_path):
    """model.pretrained reads a run's export (config.json, safetensors, score_module.pt, tokenizer.json) back whole."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    short = TINY + ["mesh.data=1", "sft.steps=1", "rl.steps=0", "eval.questions=0"]
    first = Trainer(load_config(PRESET, short + ["sft.steps=2", "rl.steps=0", f"run_dir={first_dir}"]), first_dir)
    first.run()
    # The architecture comes from config.json: the tiny preset's width 128 is left on purpose.
    second_config = load_config(None, [*short, f"model.pretrained={first_dir / 'model'}", f"run_dir={second_dir}"])
    assert second_config.model.qwen2_config().hidden_size == 32
    second = Trainer(second_config, second_dir)
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size
    exported = jax.tree.map(lambda p: np.asarray(p)[0], first.state.params)  # replica 0 of the final state
    loaded = jax.tree.map(np.asarray, second.initial_params())
    assert jax.tree.structure(loaded) == jax.tree.structure(exported)
    for path, want in jax.tree_util.tree_leaves_with_path(exported):
        np.testing.assert_array_equal(loaded_leaf(loaded, path), want, err_msg=jax.tree_util.keystr(path))
    second.run()
    assert [m["phase"] for m in _metrics(second_dir)] == ["sft"]


def loaded_leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


# No evaluation: the evaluate CLI's own 2-process test covers it (tests/test_evaluate.py).
MULTI_PROCESS_ARGS = [
    PRESET,
    *TINY,
    "mesh.data=2",
    "sft.steps=2",
    "rl.steps=1",
    "checkpoint.every=3",
    "eval.questions=0",
]


def test_two_processes_through_the_launcher_train_and_resume_like_one_process_with_two_devices(tmp_path):
    """The host-side loop (data, rewards, metrics) runs on every process; only the numbers' placement differs.
    The two processes stop after step 3; a second launch with one more RL step resumes from that checkpoint."""
    repo = Path(__file__).parents[1]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    train = ["metastone_jax.train", *MULTI_PROCESS_ARGS]
    single = subprocess.Popen(
        [sys.executable, "-m", *train, "rl.steps=2", "--run-dir", str(one)],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )

    def launch(*overrides):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "launch.local_cluster",
                "--num-processes",
                "2",
                "--",
                *train,
                *overrides,
                "--run-dir",
                str(two),
            ],
            cwd=repo,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = launch()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (two / "checkpoints" / "3").is_dir()
    resumed = launch("rl.steps=2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from the checkpoint of step 3" in resumed.stdout + resumed.stderr
    assert single.wait(timeout=600) == 0, single.stdout.read().decode()[-3000:]
    timings = ("step_s", "tokens_per_s")
    expected = [{k: v for k, v in m.items() if k not in timings} for m in _metrics(one)]
    assert [{k: v for k, v in m.items() if k not in timings} for m in _metrics(two)] == expected
    assert [m["phase"] for m in expected] == ["sft", "sft", "rl", "rl"]
    assert (two / "model" / "model.safetensors").read_bytes() == (one / "model" / "model.safetensors").read_bytes()


# The main job in a subprocess that counts JAX's persistent-cache hits and misses.
COUNT_CACHE_USE = """
import json, sys
import jax
counts = {"hits": 0, "misses": 0}
events = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
def count(event, **_):
    if event in events:
        counts[events[event]] += 1
jax.monitoring.register_event_listener(count)
from metastone_jax.train import main
assert main(sys.argv[1:]) == 0
print("CACHE " + json.dumps(counts))
"""


def test_a_second_run_loads_every_program_from_the_compilation_cache_next_to_the_runs(tmp_path):
    args = [PRESET, *TINY, "mesh.data=2", "sft.steps=0", "rl.steps=1", "eval.questions=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_ENABLE_COMPILATION_CACHE", None)  # tests/conftest.py turns the cache off for the test run

    def cache_use(name: str, *overrides: str, **extra_env) -> dict:
        command = [sys.executable, "-c", COUNT_CACHE_USE, *args, *overrides, "--run-dir", str(tmp_path / "runs" / name)]
        done = subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.split("CACHE ")[-1])

    first = cache_use("first")
    cache = tmp_path / "runs" / ".jax_cache"
    entries = len(list(cache.iterdir()))
    assert first["misses"] > 0 and first["hits"] == 0 and entries > 0
    assert cache_use("second") == {"hits": first["misses"], "misses": 0}
    # Switched off (a run without steps: initialisation and export are enough to compile something).
    assert cache_use("off", "rl.steps=0", JAX_ENABLE_COMPILATION_CACHE="false") == {"hits": 0, "misses": 0}
    assert len(list(cache.iterdir())) == entries


class CompileLog:
    """The programs JAX compiles while `active` (a listener cannot be unregistered: one for the module)."""

    def __init__(self):
        self.active, self.programs = False, []

    def __call__(self, event: str, seconds: float, **kwargs) -> None:
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.programs.append(kwargs.get("fun_name", "?"))


COMPILE_LOG = CompileLog()
jax.monitoring.register_event_duration_secs_listener(COMPILE_LOG)


@pytest.mark.slow  # the default run keeps the cross-run cache test; this one compiles every RL width
def test_a_warm_step_compiles_nothing_and_a_new_batch_width_only_the_step(tmp_path, monkeypatch):
    """Eager jnp work in the loop (one small program per shape) or a retraced step would compile again every step."""
    config = load_config(PRESET, TINY + ["sft.steps=2", "rl.steps=3", "eval.questions=0", f"run_dir={tmp_path}"])
    trainer = Trainer(config, tmp_path)
    widths = []  # the batch width of every step, in order

    def recording(build, batch_of):
        def wrapped(*args, **kwargs):
            built = build(*args, **kwargs)
            widths.append(batch_of(built)["tokens"].shape[1])
            return built

        return wrapped

    monkeypatch.setattr(train, "sft_batch", recording(train.sft_batch, lambda batch: batch))
    monkeypatch.setattr(train, "collect_rollouts", recording(train.collect_rollouts, lambda r: r.batch))
    compiled = []  # the programs compiled during every step, before its hooks (the last step's checkpoint compiles)
    trainer.hooks.insert(0, lambda end: compiled.append(COMPILE_LOG.programs[:]) or COMPILE_LOG.programs.clear())
    COMPILE_LOG.active = True
    try:
        trainer.train()
    finally:
        COMPILE_LOG.active = False
        COMPILE_LOG.programs.clear()
        trainer.checkpointer.close()
    assert len(compiled) == len(widths) == 5
    for phase in (range(0, 2), range(2, 5)):
        assert compiled[phase[0]], "a phase's first step compiles its programs"
        for step in phase[1:]:
            new_width = widths[step] not in widths[phase[0] : step]
            assert compiled[step] == (["jit(<lambda>)"] if new_width else []), (step, widths, compiled[step])
