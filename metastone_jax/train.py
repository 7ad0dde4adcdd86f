"""`python -m metastone_jax.train [PRESET] [key=value ...]`: SFT warm-start, then GRPO + SPR, then evaluation.

Every run has a run directory (printed at the start) holding the resolved `config.yaml`, `metrics.jsonl`,
`tensorboard/`, `checkpoints/`, the exported `model/` and the evaluation. Starting again with the same run
directory resumes from its newest readable checkpoint and continues exactly: the data iterators, the train state
and the step are restored, and every random key is derived from (seed, step).

One clock: `TrainState.step` is the global step, across both phases; the RL phase starts at `sft.steps` from the
SFT policy with a fresh optimizer, and that policy is the frozen reference of GRPO's KL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from comms.centralized import OneBit
from metastone_jax import tts
from metastone_jax.checkpoint import Checkpointer, CheckpointError
from metastone_jax.config import RunConfig, SFTConfig
from metastone_jax.config_loading import ConfigError, load_config, resolve_run_dir, save_config
from metastone_jax.data import arithmetic_dataset, file_dataset, start_workers
from metastone_jax.distributed import initialize_from_env
from metastone_jax.evaluate import build_tokenizer, eval_records, evaluate_records, print_table, write_outputs
from metastone_jax.hf import load_hf, save_hf
from metastone_jax.metrics_log import MetricsWriter
from metastone_jax.models.reflective import HEAD, Model, ReflectiveModel, init_params, param_shardings
from metastone_jax.rollout import collect_rollouts, make_replica_sampler, replica_params, sft_batch
from metastone_jax.sharding import make_mesh
from metastone_jax.step import make_rl_step, make_sft_step
from metastone_jax.train_state import TrainState, abstract_train_state, init_train_state, make_optimizer

PyTree = Any
COMPILATION_CACHE_BYTES = 4 << 30  # the persistent compilation cache's bound


def sft_schedule(sft: SFTConfig) -> optax.Schedule:
    """The policy's SFT learning rate by update: a linear warm-up from 0, then constant or a cosine down to 0."""
    warmup = max(sft.warmup_steps, 1)
    if sft.decay == "cosine":
        # max(): sft.steps=0 skips SFT, and the config refuses a cosine over no updates otherwise.
        return optax.warmup_cosine_decay_schedule(0.0, sft.learning_rate, warmup, max(sft.steps, warmup + 1))
    return optax.linear_schedule(0.0, sft.learning_rate, warmup)


def train_dataset(config: RunConfig, batch_size: int):
    """The global batches of the run. Every process reads all of each batch (one shard): the host-side RL loop
    (rewards, advantages, metrics) then sees the same rows on every process, and the train steps place each
    process's rows on its devices (`sharding.to_device`)."""
    task = config.task
    if task.files:
        return file_dataset(
            list(task.files),
            batch_size,
            question_field=task.question_field,
            answer_field=task.answer_field,
            answer_format=task.answer_format,
            shuffle_seed=config.seed,
            num_epochs=None,
            shard_index=0,
            shard_count=1,
        )
    return arithmetic_dataset(task.arithmetic, batch_size, shard_index=0, shard_count=1)


class StepEnd(NamedTuple):
    """What the hooks see after every step."""

    step: int  # steps taken so far (the global clock)
    phase: str  # "sft" or "rl"
    state: TrainState
    ref_params: PyTree | None  # GRPO's frozen reference (RL only)
    metrics: dict[str, float]


class Trainer:
    """A run's pieces, built from its config; `run()` trains (resuming), exports and evaluates.

    The loops are pure steps (metastone_jax.step) plus hooks: metrics, checkpoints and progress run after every
    step, each deciding for itself whether to act.
    """

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        self.tokenizer = build_tokenizer(config)
        architecture = config.model.qwen2_config()
        if architecture.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.architecture.vocab_size={architecture.vocab_size} is smaller than the tokenizer's "
                f"vocabulary of {self.tokenizer.vocab_size}"
            )
        self.mesh = make_mesh(config.mesh)
        self.algorithm = config.comm.build()
        if isinstance(self.algorithm, OneBit):
            warnings.warn(
                "comm.algorithm=onebit sends 1-bit gradients to AdamW, which then ends well above full precision's "
                "loss (every coordinate arrives as +-scale, so Adam's per-coordinate step sizes are lost); "
                "comm.algorithm=onebit_adam compresses Adam's momentum instead and trains like full precision",
                UserWarning,
                stacklevel=2,
            )
        model = config.model
        self.module = ReflectiveModel(
            architecture, True, jnp.dtype(model.dtype), jnp.dtype(model.param_dtype), model.remat, model.scan_layers
        )
        self.param_shardings = param_shardings(self.module, self.mesh)
        # One optimizer structure for both phases (a schedule each), so one checkpoint layout restores either.
        sft, rl = config.sft, config.rl
        self.sft_tx = make_optimizer(self.algorithm, sft_schedule(sft), head_learning_rate=optax.constant_schedule(0.0))
        # The head's warm-up: the policy's learning rate is 0 for the first rl.head_warmup_steps updates.
        rl_schedule = optax.join_schedules(
            [optax.constant_schedule(0.0), optax.constant_schedule(rl.learning_rate)], [rl.head_warmup_steps]
        )
        self.rl_tx = make_optimizer(
            self.algorithm,
            rl_schedule,
            head_learning_rate=optax.constant_schedule(rl.head_learning_rate),
        )
        # Traced once here so that an algorithm's checks against the model (DiLoCo: fragments <= layers) stop the
        # run as bad input before anything is compiled.
        abstract_train_state(self.module, self.algorithm, self.rl_tx, self.mesh)
        # Built here, so that a malformed data file stops the run before anything is compiled.
        self.data = {}
        if sft.steps:
            self.data["sft"] = iter(train_dataset(config, sft.batch_size))
        if rl.steps:
            self.data["rl"] = iter(train_dataset(config, rl.prompts_per_step))
        # Every process runs the same loop on the same numbers; the first one writes them down.
        self.is_lead = jax.process_index() == 0
        self.writer = MetricsWriter(run_dir, enabled=self.is_lead)
        ckpt = config.checkpoint
        self.checkpointer = Checkpointer(
            run_dir / "checkpoints", keep=ckpt.keep, every=ckpt.every, async_save=ckpt.async_save
        )
        self.progress: tqdm | None = None
        self.hooks: list[Callable[[StepEnd], None]] = [self.write_metrics, self.save_checkpoint, self.show_progress]

    # ------------------------------------------------------------------------------------------- the run

    def run(self) -> dict:
        """Trains (resuming from the latest checkpoint), then exports and evaluates; returns the eval metrics.
        The final state stays in `self.state`."""
        try:
            self.state = self.train()
        finally:
            self.checkpointer.close()  # waits for a pending save, also when training stops with an error
            if self.progress is not None:
                self.progress.close()
        return self.final_evaluation(replica_params(self.state.params))

    def train(self) -> TrainState:
        config = self.config
        sft_end, end = config.sft.steps, config.sft.steps + config.rl.steps
        step, state, ref_params = self.restore()
        self.progress = tqdm(
            total=end, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not self.is_lead
        )
        if step < sft_end:
            state = state or init_train_state(
                self.module, self.algorithm, self.sft_tx, self.mesh, self.initial_params()
            )
            state = self.sft_phase(state, range(step, sft_end))
        if step <= sft_end and (config.rl.steps or state is None):
            # RL starts from the SFT policy (or the initial one) with a fresh optimizer; it is also the reference.
            policy = self.initial_params() if state is None else replica_params(state.params)
            ref_params = jax.device_put(policy, self.param_shardings)
            state = init_train_state(self.module, self.algorithm, self.rl_tx, self.mesh, ref_params, step=sft_end)
        if step < end:
            state = self.rl_phase(state, ref_params, range(max(step, sft_end), end))
        return state

    def sft_phase(self, state: TrainState, steps: range) -> TrainState:
        config = self.config
        sft_step = make_sft_step(
            self.module,
            self.algorithm,
            self.sft_tx,
            self.mesh,
            micro_batch_size=config.sft.micro_batch_size,
            logits_chunk=config.model.logits_chunk,
        )
        for step in steps:
            started = time.perf_counter()
            samples = next(self.data["sft"])
            batch = sft_batch(self.tokenizer, samples["question"], samples["solution"], config.task.instruction)
            state, metrics = sft_step(state, batch, phase=self.algorithm.phase(step))
            metrics = {k: float(v) for k, v in metrics.items()} | {"step_s": time.perf_counter() - started}
            self.end_step(StepEnd(step + 1, "sft", state, None, metrics))
        return state

    def rl_phase(self, state: TrainState, ref_params: PyTree, steps: range) -> TrainState:
        config = self.config
        start_workers()  # the answer checker starts while the first step compiles
        rl_step = make_rl_step(
            self.module,
            self.algorithm,
            self.rl_tx,
            self.mesh,
            config.rl,
            config.sampling.temperature,
            config.seed,
            logits_chunk=config.model.logits_chunk,
        )
        sampler = make_replica_sampler(
            self.module,
            self.mesh,
            config.sampling,
            (self.tokenizer.eos_id,),
            self.tokenizer.pad_id,
            config.rl.group_size,
            config.rl.rollout_batch_size,
        )
        for step in steps:
            started = time.perf_counter()
            samples = next(self.data["rl"])
            key = jax.random.fold_in(jax.random.key(config.seed), step)
            rollouts = collect_rollouts(
                sampler,
                state.params,
                self.tokenizer,
                samples["question"],
                samples["answer"],
                key,
                config.rl.group_size,
                config.task.instruction,
            )
            # The RL optimizer's update count is the number of RL steps taken.
            phase = self.algorithm.phase(step - config.sft.steps)
            state, metrics = rl_step(state, rollouts.batch, ref_params, phase=phase)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step, so the clock counts it
            seconds = time.perf_counter() - started
            metrics |= {
                "reward": float(rollouts.batch["rewards"].mean()),
                "sprm_auroc": tts.auroc(rollouts.trajectory_scores, rollouts.batch["outcome"] > 0),
                "response_tokens": rollouts.generated_tokens / len(rollouts.responses),
                "tokens_per_s": rollouts.generated_tokens / seconds,
                "step_s": seconds,
            }
            self.end_step(StepEnd(step + 1, "rl", state, ref_params, metrics))
        return state

    def end_step(self, end: StepEnd) -> None:
        for hook in self.hooks:
            hook(end)

    # ------------------------------------------------------------------------------------------- hooks

    def write_metrics(self, end: StepEnd) -> None:
        self.writer.write(end.step, end.metrics, end.phase)

    def save_checkpoint(self, end: StepEnd) -> None:
        last = end.step == self.config.sft.steps + self.config.rl.steps
        self.checkpointer.maybe_save(
            end.step,
            {"state": end.state} if end.ref_params is None else {"state": end.state, "ref_params": end.ref_params},
            data_state={name: iterator.get_state() for name, iterator in self.data.items()},
            extra={"phase": end.phase},
            force=last,
        )

    def show_progress(self, end: StepEnd) -> None:
        self.progress.update(1)
        shown = {k: f"{v:.3g}" for k, v in end.metrics.items() if k in ("loss", "reward", "sprm_auroc")}
        self.progress.set_postfix(shown)

    # ------------------------------------------------------------------------------------------- state

    def initial_params(self) -> PyTree:
        """Random parameters, or the pretrained ones with the released head (a fresh head when there is none)."""
        key = jax.random.key(self.config.seed)
        if not self.config.model.pretrained:
            return init_params(self.module, key, self.mesh)
        loaded = load_hf(self.config.model.pretrained, mesh=self.mesh, dtype=self.module.param_dtype)
        if HEAD in loaded.params:
            return loaded.params
        return {**loaded.params, HEAD: init_params(self.module, key, self.mesh, only=HEAD)}

    def restore(self) -> tuple[int, TrainState | None, PyTree | None]:
        """(step, state, reference params) of the newest readable checkpoint; (0, None, None) for a new run.

        SFT checkpoints hold the state, RL ones the reference policy too; both phases' states have one layout.
        """
        abstract_state = abstract_train_state(self.module, self.algorithm, self.rl_tx, self.mesh)
        abstract_params = jax.tree.map(
            lambda state_leaf, sharding: jax.ShapeDtypeStruct(
                state_leaf.shape[1:], state_leaf.dtype, sharding=sharding
            ),
            abstract_state.params,
            self.param_shardings,
        )

        def layout(step: int) -> dict:
            if step > self.config.sft.steps:
                return {"state": abstract_state, "ref_params": abstract_params}
            return {"state": abstract_state}

        restored = self.checkpointer.restore_latest(layout)
        if restored is None:
            return 0, None, None
        for name, iterator in self.data.items():
            iterator.set_state(restored.data_state[name])
        self.writer.truncate_after(restored.step)
        print(f"resumed from the checkpoint of step {restored.step} in {self.checkpointer.directory}", flush=True)
        return restored.step, restored.state["state"], restored.state.get("ref_params")

    def final_evaluation(self, params: PyTree) -> dict:
        """Exports the trained model (run_dir/model, Hugging Face format + tokenizer) and evaluates it."""
        config = self.config
        params = jax.device_put(params, self.param_shardings)
        save_hf(Model(self.module, params, self.mesh), self.run_dir / "model")
        self.tokenizer.save(str(self.run_dir / "model" / "tokenizer.json"))
        if config.eval.questions == 0:
            return {}
        records = eval_records(config)
        print(f"evaluating on {len(records)} questions x {config.eval.samples} samples", flush=True)
        result = evaluate_records(
            self.module,
            params,
            self.tokenizer,
            records,
            mesh=self.mesh,
            sampling=config.eval_sampling,
            num_samples=config.eval.samples,
            modes=config.eval.ks,
            seed=config.seed,
            instruction=config.task.instruction,
        )
        if self.is_lead:
            write_outputs(result, self.run_dir)
            print_table(result)
        return result.metrics


def use_compilation_cache(run_dir: Path) -> None:
    """JAX's persistent compilation cache, on for every run, in `.jax_cache` next to the run directory, so that a
    second run (a resumed one, the next run of a sweep) loads its compiled programs instead of compiling them again.

    JAX's own variables override it: JAX_COMPILATION_CACHE_DIR names another directory, JAX_ENABLE_COMPILATION_CACHE=
    false turns it off (tests/conftest.py does, so that a test run writes no cache). The cache is bounded and
    least-recently-used entries go first; bounding it also makes JAX take a file lock around every read and write, so
    that runs started at once share one directory safely (an entry that cannot be read is compiled, with a warning).
    """
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(run_dir.absolute().parent / ".jax_cache"))
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    # Every program, however small or quick to compile: a CPU run is many small programs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metastone_jax.train",
        description="SFT warm-start, then GRPO + SPR loss, then test-time-scaling evaluation.",
        epilog="Example: python -m metastone_jax.train tiny rl.steps=50 comm.algorithm=onebit_adam mesh.data=2",
    )
    parser.add_argument("preset", nargs="?", help="a preset in configs/ (default tiny) or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.steps=10")
    parser.add_argument("--run-dir", help="where the run writes (and resumes from); default runs/<timestamp>")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run with jax.distributed.initialize() (TPU pods, SLURM: auto-detected)",
    )
    args = parser.parse_args(argv)
    initialize_from_env(auto_detect=args.distributed)
    if args.preset and "=" in args.preset:
        args.overrides.insert(0, args.preset)
        args.preset = None
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        config = load_config(args.preset, overrides)
        if jax.process_count() > 1 and not config.run_dir:
            raise ConfigError("with several processes give --run-dir (or run_dir=): each would pick its own timestamp")
        run_dir = resolve_run_dir(config)
        print(f"run directory: {run_dir.absolute()}", flush=True)
        use_compilation_cache(run_dir)
        if jax.process_index() == 0:
            save_config(config, run_dir)
        # Building the trainer reads every input (tokenizer, pretrained model, data files): a ValueError is bad input.
        trainer = Trainer(config, run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = trainer.run()
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": str(run_dir), **{k: v for k, v in metrics.items() if not isinstance(v, dict)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
