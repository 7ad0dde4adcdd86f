"""Run configuration: presets, dotted overrides, YAML round trip, and the error messages at the boundary."""

import dataclasses
import re

import pytest

import comms
from metastone_jax.config import RunConfig
from metastone_jax.config_loading import (
    ConfigError,
    load_config,
    preset_names,
    resolve_run_dir,
    save_config,
    to_yaml,
)


def test_no_preset_is_the_tiny_preset_and_presets_compose_from_the_defaults():
    assert load_config(None) == load_config("tiny")
    # qwen2_1.5b is the documented defaults plus a few keys (and the micro-batches that fit a TPU v5p-16); the other
    # scales inherit from it.
    base = load_config("qwen2_1.5b")
    assert base.rl == dataclasses.replace(RunConfig().rl, steps=1000, micro_batch_size=64)
    assert load_config("multislice_onebit") == dataclasses.replace(
        base, mesh=dataclasses.replace(base.mesh, data=2), comm=load_config("multislice_onebit").comm
    )


def test_all_required_presets_exist():
    assert {"tiny", "qwen2_1.5b", "qwen2_7b", "qwen2_32b", "multislice_onebit"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips_through_yaml(name, tmp_path):
    config = load_config(name)
    path = save_config(config, tmp_path)
    assert path == tmp_path / "config.yaml"
    assert load_config(str(path)) == config


# The shapes of the released bases' config.json files and the released hyperparameters (docs/algorithms.md).
@pytest.mark.parametrize(
    "name, hidden, layers, heads, kv_heads, vocab, lr, head_lr, prompts, max_new_tokens",
    [
        ("qwen2_1.5b", 1536, 28, 12, 2, 151936, 1e-6, 1e-5, 32, 8192),
        ("qwen2_32b", 5120, 64, 40, 8, 152064, 1e-7, 3e-6, 128, 32768),
    ],
)
def test_scale_presets_carry_the_released_shapes_and_hyperparameters(
    name, hidden, layers, heads, kv_heads, vocab, lr, head_lr, prompts, max_new_tokens
):
    config = load_config(name)
    arch = config.model.architecture
    assert (
        arch.hidden_size,
        arch.num_hidden_layers,
        arch.num_attention_heads,
        arch.num_key_value_heads,
        arch.vocab_size,
    ) == (hidden, layers, heads, kv_heads, vocab)
    assert (config.rl.learning_rate, config.rl.head_learning_rate) == (lr, head_lr)
    assert (config.rl.prompts_per_step, config.rl.group_size) == (prompts, 8)
    assert config.sampling.max_new_tokens == max_new_tokens
    assert config.sampling.temperature == 0.6


def test_seven_b_preset_lies_between_the_released_ones():
    small, middle, large = (load_config(n) for n in ("qwen2_1.5b", "qwen2_7b", "qwen2_32b"))
    assert middle.model.architecture.hidden_size == 3584
    for field in ("learning_rate", "head_learning_rate"):
        assert getattr(large.rl, field) <= getattr(middle.rl, field) <= getattr(small.rl, field)
    assert small.rl.prompts_per_step <= middle.rl.prompts_per_step <= large.rl.prompts_per_step
    assert small.sampling.max_new_tokens <= middle.sampling.max_new_tokens <= large.sampling.max_new_tokens


def test_multislice_preset_compresses_over_the_data_axis_with_onebit_adam():
    config = load_config("multislice_onebit")
    assert config.mesh.data > 1
    assert config.comm.algorithm == "onebit_adam"
    comms.get(config.comm.algorithm, **config.comm.options)


def test_overrides_set_nested_keys_lists_and_mappings_and_keep_the_rest_of_the_preset():
    config = load_config(
        "qwen2_1.5b",
        [
            "rl.steps=7",
            "model.architecture.num_hidden_layers=3",
            "task.arithmetic.num_steps=[1, 3]",
            "eval.modes=[low]",
            "task.files=[]",
            "comm.algorithm=local_sgd",
            "comm.options={period: 2}",
            "model.pretrained=null",
        ],
    )
    base = load_config("qwen2_1.5b")
    assert config.rl.steps == 7
    assert config.model.architecture.num_hidden_layers == 3
    assert config.task.arithmetic.num_steps == (1, 3)
    assert config.eval.modes == ("low",)
    assert config.comm.algorithm == "local_sgd" and config.comm.options == {"period": 2}
    # Everything not overridden keeps the preset's value, not the class default.
    assert config.rl.learning_rate == base.rl.learning_rate == 1e-6
    assert config.model.architecture.hidden_size == base.model.architecture.hidden_size == 1536
    assert (
        dataclasses.replace(config, rl=base.rl, model=base.model, task=base.task, eval=base.eval, comm=base.comm)
        == base
    )


def test_a_file_inherits_a_preset_and_errors_name_the_file_that_set_the_key(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("inherits: qwen2_1.5b\nrl:\n  steps: 5\n")
    base = load_config("qwen2_1.5b")
    assert load_config(str(mine)) == dataclasses.replace(base, rl=dataclasses.replace(base.rl, steps=5))
    parent = tmp_path / "parent.yaml"
    parent.write_text("inherits: tiny\n\nsft:\n  batch_size: 0\n")
    mine.write_text("inherits: parent.yaml\nrl:\n  steps: 5\n")
    assert f"sft.batch_size=0 ({parent}, line 4)" in _error(str(mine))
    parent.write_text("inherits: mine.yaml\n")
    assert "cycle" in _error(str(mine))


def test_later_override_wins_and_floats_without_a_dot_are_numbers():
    config = load_config(None, ["rl.learning_rate=1e-6", "rl.learning_rate=2e-6", "sft.learning_rate=3"])
    assert config.rl.learning_rate == 2e-6 and isinstance(config.rl.learning_rate, float)
    assert config.sft.learning_rate == 3.0 and isinstance(config.sft.learning_rate, float)


def test_round_trip_of_an_overridden_config(tmp_path):
    config = load_config(
        "tiny",
        [
            "comm.algorithm=onebit_adam",
            "comm.options={warmup_steps: 3}",
            "run_dir=out/x",
            "model.architecture.eos_token_id=[1, 2]",
            "sampling.top_p=0.95",
        ],
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(str(path)) == config


def test_run_dir_defaults_to_a_timestamp_under_runs():
    assert re.fullmatch(r"runs/\d{8}-\d{6}", str(resolve_run_dir(RunConfig())))
    assert str(resolve_run_dir(load_config(None, ["run_dir=somewhere/else"]))) == "somewhere/else"


def _error(preset=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    return str(info.value)


def test_unknown_top_level_key_in_a_file_names_it_the_file_line_and_suggests(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\nmodle:\n  remat: true\n")
    message = _error(str(path))
    assert "unknown key 'modle'" in message
    assert f"{path}, line 2" in message
    assert "did you mean 'model'" in message
    assert "The keys of the top level are: model, mesh, task, sft, rl, sampling, comm, checkpoint, eval" in message


def test_unknown_nested_key_in_an_override_names_the_override_and_the_section_keys():
    message = _error("tiny", ["rl.lerning_rate=1e-5"])
    assert "unknown key 'rl.lerning_rate'" in message
    assert "override 'rl.lerning_rate=1e-5'" in message
    assert "did you mean 'learning_rate'" in message
    assert "The keys of section 'rl' are: steps, prompts_per_step, group_size, learning_rate" in message


def test_unknown_key_deep_in_the_architecture_is_found():
    message = _error(None, ["model.architecture.hidden_sise=64"])
    assert "model.architecture.hidden_sise" in message and "did you mean 'hidden_size'" in message


def test_wrong_value_type_names_key_value_and_expected_type():
    message = _error(None, ["rl.steps=ten"])
    assert "rl.steps='ten'" in message and "override 'rl.steps=ten'" in message and "valid integer" in message
    assert "valid integer" in _error(None, ["rl.steps=true"])  # YAML's true is not 1
    assert "valid boolean" in _error(None, ["checkpoint.async_save=maybe"])
    assert "at most 2 items" in _error(None, ["task.arithmetic.num_steps=[1, 2, 3]"])
    assert "dictionary" in _error(None, ["rl=5"])


def test_out_of_range_values_name_what_is_allowed():
    assert "sft.steps=-1" in (message := _error(None, ["sft.steps=-1"])) and "greater than or equal to 0" in message
    assert "greater than or equal to 2" in _error(None, ["rl.group_size=1"])
    assert "less than or equal to 1" in _error(None, ["sampling.top_p=1.5"])
    assert "'float32', 'bfloat16' or 'float16'" in _error(None, ["model.dtype=float8"])
    assert "'high'" in _error(None, ["eval.modes=[ultra]"])
    assert "-1" in _error(None, ["mesh.fsdp=0"])
    message = _error(None, ["eval.samples=4"])
    assert "section 'eval' (override 'eval.samples=4')" in message and "samples=4" in message and "k=8" in message


def test_value_error_in_a_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rl:\n  steps: 3\n  group_size: 0\n")
    message = _error(str(path))
    assert "rl.group_size=0" in message and f"{path}, line 3" in message


def test_unknown_communication_algorithm_lists_the_choices():
    message = _error(None, ["comm.algorithm=twobit"])
    assert "comm.algorithm='twobit'" in message
    for name in comms.ALGORITHMS:
        assert name in message


def test_bad_communication_options_name_the_option():
    assert "no option 'bogus'" in _error(None, ["comm.options={bogus: 1}"])
    message = _error(None, ["comm.algorithm=onebit_adam", "comm.options={warmup_steps: x}"])
    assert "options.warmup_steps='x'" in message and "override 'comm.options={warmup_steps: x}'" in message
    assert "period" in _error(None, ["comm.algorithm=local_sgd", "comm.options={period: 0}"])


def test_hierarchical_is_refused_at_config_time_with_the_alternative():
    message = _error(None, ["comm.algorithm=hierarchical"])
    assert "fast replica axis" in message and "onebit_adam" in message


def test_invalid_task_knobs_name_the_section_and_the_override():
    message = _error(None, ["task.arithmetic.max_value=3"])
    assert "task.arithmetic" in message and "override 'task.arithmetic.max_value=3'" in message
    assert "max_value" in message


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rl:\n  steps: 3\n  temperature: [0.6\nseed: 1\n")
    message = _error(str(path))
    assert str(path) in message and "invalid YAML" in message
    assert re.search(r"line [34]", message)


def test_duplicate_yaml_key_names_the_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nrun_dir: x\nseed: 3\n")
    message = _error(str(path))
    assert "duplicate key 'seed'" in message and "line 3" in message


def test_missing_file_unknown_preset_and_malformed_override():
    assert "does not exist" in _error("/nonexistent/run.yaml")
    message = _error("tiyn")
    assert "unknown preset 'tiyn'" in message and "did you mean 'tiny'" in message and "qwen2_32b" in message
    assert "dotted.key=value" in _error(None, ["rl.steps"])


def test_missing_files_and_tokenizer_are_reported(tmp_path):
    assert "config.json" in _error(None, [f"model.pretrained={tmp_path}"])
    assert "task.files.0" in _error(None, [f"task.files=[{tmp_path / 'missing.jsonl'}]"])
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    assert "model.tokenizer" in _error(None, [f"task.files=[{data}]"])


def test_micro_and_rollout_batch_sizes_must_divide_their_batches():
    message = _error(None, ["rl.micro_batch_size=6"])  # tiny: 8 prompts x 4 responses
    assert "rl.micro_batch_size=6 does not divide rl.prompts_per_step x rl.group_size=32" in message
    assert "sft.micro_batch_size=5 does not divide sft.batch_size=32" in _error(None, ["sft.micro_batch_size=5"])
    assert "rl.rollout_batch_size=3 does not divide rl.prompts_per_step=8" in _error(None, ["rl.rollout_batch_size=3"])
    config = load_config(None, ["rl.micro_batch_size=8", "rl.rollout_batch_size=4", "model.logits_chunk=16"])
    assert (config.rl.micro_batch_size, config.rl.rollout_batch_size, config.model.logits_chunk) == (8, 4, 16)


def test_the_sft_decay_is_one_of_its_names_and_needs_updates_after_the_warmup():
    assert (
        "sft.decay='linear'" in (message := _error(None, ["sft.decay=linear"])) and "'constant' or 'cosine'" in message
    )
    message = _error(None, ["sft.steps=20", "sft.warmup_steps=20", "sft.decay=cosine"])
    assert "sft.decay=cosine decays after the warm-up, so sft.warmup_steps=20 must be below sft.steps=20" in message
    assert load_config(None, ["sft.steps=0", "sft.decay=cosine"]).sft.decay == "cosine"  # SFT skipped: nothing to decay
    assert load_config(None).sft.decay == "constant"


def test_the_head_warmup_is_part_of_the_rl_steps():
    message = _error(None, ["rl.steps=10", "rl.head_warmup_steps=11"])
    assert "rl.head_warmup_steps=11 exceeds rl.steps=10" in message
    assert load_config(None, ["rl.steps=10", "rl.head_warmup_steps=10"]).rl.head_warmup_steps == 10


@pytest.mark.parametrize("name", [n for n in preset_names() if n not in ("tiny", "micro")])
def test_scale_presets_keep_the_released_spr_recipe(name):
    rl = load_config(name).rl
    assert rl.spr_agreement_filter and not rl.spr_mixed_groups_only and rl.head_warmup_steps == 0
    assert rl.sprm_backbone_grad_scale == RunConfig().rl.sprm_backbone_grad_scale == 1e-4


def test_mesh_with_two_open_axes_is_refused():
    assert "at most one axis may be -1" in _error(None, ["mesh.data=-1"])


def test_pretrained_directory_supplies_the_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, '
        '"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}'
    )
    config = load_config(None, [f"model.pretrained={tmp_path}"])
    built = config.model.qwen2_config()
    assert (built.vocab_size, built.hidden_size, built.num_hidden_layers, built.num_key_value_heads) == (300, 64, 3, 2)
    assert load_config(None).model.qwen2_config() == load_config(None).model.architecture
