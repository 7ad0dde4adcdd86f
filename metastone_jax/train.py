"""`python -m metastone_jax.train [PRESET] [key=value ...]`: SFT warm-start, then GRPO + SPR, then evaluation.

Every run has a run directory (printed at the start) holding the resolved `config.yaml`, `metrics.jsonl`,
`tensorboard/`, `checkpoints/` and `eval.json`. Starting again with the same run directory resumes from its newest
readable checkpoint and continues exactly: the data iterator, the train state and the step are restored, and every
random key is derived from (seed, step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import comms
from comms.centralized import OneBit
from launch.local_cluster import initialize_from_env
from metastone_jax import tts
from metastone_jax.checkpoint import Checkpointer
from metastone_jax.config import RunConfig
from metastone_jax.config_loading import ConfigError, load_config, resolve_run_dir, save_config
from metastone_jax.data import TextTokenizer, arithmetic_dataset, build_arithmetic_tokenizer, file_dataset, load_records
from metastone_jax.evaluate import embedded_eval_records, evaluate_records, print_table, write_outputs
from metastone_jax.hf import load_hf, save_hf
from metastone_jax.losses import RLLossConfig
from metastone_jax.metrics_log import MetricsWriter
from metastone_jax.models.reflective import Model, ReflectiveModel, init_params, param_shardings
from metastone_jax.models.sprm import SPRMHead
from metastone_jax.rollout import collect_rollouts, make_replica_sampler, replica_params, sft_batch
from metastone_jax.sampling import SamplingConfig
from metastone_jax.sharding import make_mesh
from metastone_jax.step import TrainState, init_train_state, make_optimizer, make_rl_step, make_sft_step


def build_tokenizer(config: RunConfig) -> TextTokenizer:
    if config.model.tokenizer:
        return TextTokenizer.from_file(config.model.tokenizer)
    if config.model.pretrained:
        return TextTokenizer.from_file(config.model.pretrained)
    return build_arithmetic_tokenizer(config.task.arithmetic)


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


class Trainer:
    """The outer loop: data, steps, metrics, checkpoints; the steps themselves are pure (metastone_jax.step)."""

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
        self.algorithm = comms.get(config.comm.algorithm, **config.comm.options)
        if isinstance(self.algorithm, OneBit):
            warnings.warn(
                "comm.algorithm=onebit sends 1-bit gradients to AdamW, which then ends well above full precision's "
                "loss (every coordinate arrives as +-scale, so Adam's per-coordinate step sizes are lost); "
                "comm.algorithm=onebit_adam compresses Adam's momentum instead and trains like full precision",
                UserWarning,
                stacklevel=2,
            )
        dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
        self.module = ReflectiveModel(
            architecture, True, dtype, param_dtype, config.model.remat, config.model.scan_layers
        )
        self.param_shardings = param_shardings(self.module, self.mesh)
        rl = config.rl
        self.loss_config = RLLossConfig(
            group_size=rl.group_size,
            clip_eps=rl.clip_eps,
            kl_coef=rl.kl_coef,
            entropy_coef=rl.entropy_coef,
            temperature=rl.temperature,
            sprm_backbone_grad_scale=rl.sprm_backbone_grad_scale,
        )
        self.sampling = SamplingConfig(rl.max_new_tokens, rl.temperature, rl.top_p)
        self.eos_ids = (self.tokenizer.eos_id,)
        # One optimizer structure for both phases (a schedule each), so one checkpoint layout restores either.
        sft_schedule = optax.linear_schedule(0.0, config.sft.learning_rate, max(config.sft.warmup_steps, 1))
        self.sft_tx = make_optimizer(self.algorithm, sft_schedule, head_learning_rate=optax.constant_schedule(0.0))
        self.rl_tx = make_optimizer(
            self.algorithm,
            optax.constant_schedule(rl.learning_rate),
            head_learning_rate=optax.constant_schedule(rl.head_learning_rate),
        )
        # Every process runs the same loop on the same numbers; the first one writes them down.
        self.is_lead = jax.process_index() == 0
        self.writer = MetricsWriter(run_dir, enabled=self.is_lead)
        ckpt = config.checkpoint
        self.checkpointer = Checkpointer(
            run_dir / "checkpoints", keep=ckpt.keep, every=ckpt.every, async_save=ckpt.async_save
        )

    # ------------------------------------------------------------------------------------------- state

    def initial_params(self) -> Any:
        """Random parameters, or the pretrained ones with the released head (a fresh head when there is none)."""
        key = jax.random.key(self.config.seed)
        if not self.config.model.pretrained:
            return init_params(self.module, key, self.mesh)
        loaded = load_hf(self.config.model.pretrained, mesh=self.mesh, dtype=self.module.param_dtype)
        if "sprm" in loaded.params:
            return loaded.params
        head = SPRMHead(self.module.config.hidden_size, dtype=self.module.dtype, param_dtype=self.module.param_dtype)
        features = jnp.zeros((1, self.module.config.hidden_size), self.module.dtype)
        init_head = jax.jit(
            lambda k: nn.unbox(head.init(k, features)["params"]), out_shardings=self.param_shardings["sprm"]
        )
        return {**loaded.params, "sprm": init_head(key)}

    def checkpoint_tree(self, state: TrainState, ref_params: Any) -> dict:
        return {"state": state, "ref_params": ref_params}

    def abstract_checkpoint(self, state: TrainState, ref_params: Any) -> dict:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self.checkpoint_tree(state, ref_params),
        )

    # ------------------------------------------------------------------------------------------- the run

    def run(self) -> dict:
        """Trains (resuming from the latest checkpoint), then exports and evaluates; returns the eval metrics.
        The final state stays in `self.state`."""
        try:
            self.state = self._train()
        finally:
            self.checkpointer.close()  # waits for a pending save, also when training stops with an error
        return self.final_evaluation(self.state)

    def _train(self) -> TrainState:
        config = self.config
        params = self.initial_params()
        # The state of either phase has the same layout; `ref_params` is the frozen policy GRPO's KL refers to.
        state = init_train_state(self.module, self.algorithm, self.sft_tx, self.mesh, params)
        ref_params = params
        total_steps = config.sft.steps + config.rl.steps
        data = train_dataset(config, config.sft.batch_size if config.sft.steps else config.rl.prompts_per_step)
        rl_data = train_dataset(config, config.rl.prompts_per_step)
        iterators = {"sft": iter(data), "rl": iter(rl_data)}
        step = 0
        restored = self.checkpointer.restore_latest(self.abstract_checkpoint(state, ref_params))
        if restored is not None:
            step = restored.step
            state, ref_params = restored.state["state"], restored.state["ref_params"]
            for name, it in iterators.items():
                it.set_state(restored.data_state[name])
            self.writer.truncate_after(step)
            print(f"resumed from the checkpoint of step {step} in {self.checkpointer.directory}", flush=True)

        sft_step = make_sft_step(self.module, self.algorithm, self.sft_tx, self.mesh)
        rl_step = make_rl_step(self.module, self.algorithm, self.rl_tx, self.mesh, self.loss_config, config.seed)
        sampler = make_replica_sampler(
            self.module, self.mesh, self.sampling, self.eos_ids, self.tokenizer.pad_id, config.rl.group_size
        )
        progress = tqdm(
            total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not self.is_lead
        )
        while step < total_steps:
            started = time.perf_counter()
            if step < config.sft.steps:
                phase = "sft"
                samples = next(iterators["sft"])
                batch = sft_batch(self.tokenizer, samples["question"], samples["solution"], config.task.instruction)
                comm_phase = self.algorithm.phase(step)  # the SFT optimizer's update count is the step
                state, metrics = sft_step(state, batch, phase=comm_phase)
                metrics = {k: float(v) for k, v in metrics.items()}
            else:
                phase = "rl"
                if step == config.sft.steps:
                    # The RL phase starts from the SFT policy with fresh optimizer state; it is also the reference.
                    ref_params = jax.device_put(replica_params(state.params), self.param_shardings)
                    state = init_train_state(self.module, self.algorithm, self.rl_tx, self.mesh, ref_params)
                    state = state._replace(step=jnp.asarray(step, jnp.int32))
                samples = next(iterators["rl"])
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
                comm_phase = self.algorithm.phase(step - config.sft.steps)  # the RL optimizer started at sft.steps
                state, metrics = rl_step(state, rollouts.batch, ref_params, phase=comm_phase)
                metrics = {k: float(v) for k, v in metrics.items()}
                metrics["reward"] = float(rollouts.batch["rewards"].mean())
                metrics["sprm_auroc"] = tts.auroc(rollouts.trajectory_scores, rollouts.batch["outcome"] > 0)
                metrics["response_tokens"] = rollouts.generated_tokens / len(rollouts.responses)
                metrics["tokens_per_s"] = rollouts.generated_tokens / (time.perf_counter() - started)
            step += 1
            metrics["step_s"] = time.perf_counter() - started
            self.writer.write(step, metrics, phase)
            progress.update(1)
            progress.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "reward", "sprm_auroc")})
            self.checkpointer.maybe_save(
                step,
                self.checkpoint_tree(state, ref_params),
                data_state={name: it.get_state() for name, it in iterators.items()},
                extra={"phase": phase},
                force=step == total_steps,
            )
        progress.close()
        return state

    def final_evaluation(self, state: TrainState) -> dict:
        """Exports the trained model (run_dir/model, Hugging Face format + tokenizer) and evaluates it."""
        config = self.config
        params = jax.device_put(replica_params(state.params), self.param_shardings)
        save_hf(Model(self.module, params, self.mesh), self.run_dir / "model")
        self.tokenizer.save(str(self.run_dir / "model" / "tokenizer.json"))
        if config.eval.questions == 0:
            return {}
        if config.task.files:
            records = load_records(
                config.task.files[0],
                question_field=config.task.question_field,
                answer_field=config.task.answer_field,
                answer_format=config.task.answer_format,
            )
            records = records[: config.eval.questions]
        else:
            records = embedded_eval_records(config.task.arithmetic, config.eval.questions)
        print(f"evaluating on {len(records)} questions x {config.eval.samples} samples", flush=True)
        sampling = SamplingConfig(config.rl.max_new_tokens, config.rl.temperature, config.rl.top_p)
        result = evaluate_records(
            self.module,
            params,
            self.tokenizer,
            records,
            mesh=self.mesh,
            sampling=sampling,
            num_samples=config.eval.samples,
            modes=config.eval.modes,
            seed=config.seed,
            instruction=config.task.instruction,
        )
        if self.is_lead:
            write_outputs(result, self.run_dir)
            print_table(result)
        return result.metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metastone_jax.train",
        description="SFT warm-start, then GRPO + SPR loss, then test-time-scaling evaluation.",
        epilog="Example: python -m metastone_jax.train tiny rl.steps=50 comm.algorithm=onebit_adam mesh.data=2",
    )
    parser.add_argument("preset", nargs="?", help="a preset in configs/ (e.g. tiny, qwen2_1.5b) or a .yaml path")
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
        if jax.process_index() == 0:
            save_config(config, run_dir)
        trainer = Trainer(config, run_dir)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = trainer.run()
    print(json.dumps({"run_dir": str(run_dir), **{k: v for k, v in metrics.items() if not isinstance(v, dict)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
