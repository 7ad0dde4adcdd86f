"""Tokenizers: the built arithmetic one round-trips and keeps markers as single ids; HF tokenizer.json loads."""

import json

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from metastone_jax.data.arithmetic import ArithmeticTask, format_prompt
from metastone_jax.data.tokenizer import TextTokenizer, build_arithmetic_tokenizer

TASK = ArithmeticTask(seed=2, num_steps=(1, 5), max_value=120, operand_range=(1, 12))


@pytest.fixture(scope="module")
def tokenizer():
    return build_arithmetic_tokenizer(TASK)


def test_prompt_plus_solution_round_trips_exactly(tokenizer):
    for index in range(200):
        sample = TASK.sample(index)
        text = format_prompt(sample["question"]) + sample["solution"]
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_markers_are_single_ids_and_each_step_ends_with_the_delimiter_id(tokenizer):
    think_open, think_close = tokenizer.think_ids
    assert tokenizer.encode("<think>") == [think_open]
    assert tokenizer.encode("</think>") == [think_close]
    assert len(tokenizer.delimiter_ids) == 1 and tokenizer.encode(".\n\n") == list(tokenizer.delimiter_ids)
    delimiter = tokenizer.delimiter_ids[0]
    for index in range(100):
        solution = TASK.sample(index)["solution"]
        ids = tokenizer.encode(solution)
        assert ids[0] == think_open and ids.count(think_open) == 1 and ids.count(think_close) == 1
        assert ids.count(delimiter) == solution.count(".\n\n")
        assert ids[ids.index(think_close) - 1] == delimiter  # the last step is closed before </think>


def test_every_number_up_to_the_cap_is_one_known_token(tokenizer):
    unknown = tokenizer.token_to_id("<unk>")
    for number in range(TASK.max_value + 1):
        for text in (str(number), f" {number}"):
            ids = tokenizer.encode(text)
            assert len(ids) == 1 and ids[0] != unknown, text
    number_ids = {tokenizer.encode(f"{space}{number}")[0] for number in range(121) for space in ("", " ")}
    assert len(number_ids) == 2 * 121  # all distinct
    assert tokenizer.vocab_size <= len(number_ids) + 32  # plus a handful of symbols and specials


def test_pad_and_eos_are_distinct_special_ids_dropped_by_decode(tokenizer):
    text_ids = set(tokenizer.encode(format_prompt(TASK.sample(0)["question"]) + TASK.sample(0)["solution"]))
    assert len({tokenizer.pad_id, tokenizer.eos_id}) == 2 and not text_ids & {tokenizer.pad_id, tokenizer.eos_id}
    ids = tokenizer.encode("</think> 42") + [tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "</think> 42"


def test_saved_tokenizer_reloads_with_the_same_ids(tokenizer, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    tokenizer.save(path)
    reloaded = TextTokenizer.from_file(path)
    text = format_prompt(TASK.sample(5)["question"]) + TASK.sample(5)["solution"]
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert (reloaded.pad_id, reloaded.eos_id, reloaded.think_ids, reloaded.delimiter_ids) == (
        tokenizer.pad_id,
        tokenizer.eos_id,
        tokenizer.think_ids,
        tokenizer.delimiter_ids,
    )


def _tiny_byte_level_bpe(extra_tokens: list[str]) -> tokenizers.Tokenizer:
    """A GPT-2/Qwen2-style byte-level BPE trained on a few lines, built independently of the library."""
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["First add the numbers.\n\nThen multiply them.\n\nSo the answer is 12.\n\n"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.add_tokens([AddedToken(token, normalized=False, special=False) for token in extra_tokens])
    return bpe


def test_hf_tokenizer_json_gives_think_ids_delimiter_ids_and_eos_from_its_config(tmp_path):
    bpe = _tiny_byte_level_bpe(["<think>", "</think>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    loaded = TextTokenizer.from_file(str(tmp_path))
    assert loaded.think_ids == (bpe.token_to_id("<think>"), bpe.token_to_id("</think>"))
    assert list(loaded.delimiter_ids) == bpe.encode(".\n\n").ids
    assert bpe.decode(list(loaded.delimiter_ids)) == ".\n\n"
    assert loaded.eos_id == bpe.token_to_id("<|im_end|>")
    assert loaded.pad_id == bpe.token_to_id("<|endoftext|>")
    assert loaded.vocab_size == bpe.get_vocab_size(with_added_tokens=True)
    text = "<think>First add.\n\n</think> 12"
    assert loaded.decode(loaded.encode(text)) == text


def test_hf_tokenizer_without_think_tokens_reports_none_and_falls_back_to_known_eos(tmp_path):
    path = tmp_path / "tokenizer.json"
    _tiny_byte_level_bpe([]).save(str(path))
    loaded = TextTokenizer.from_file(str(path))
    assert loaded.think_ids is None
    assert loaded.eos_id == loaded.token_to_id("<|endoftext|>")


def test_tokenizer_that_cannot_encode_the_delimiter_is_rejected_naming_the_file(tmp_path):
    word_level = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "a": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "no_delimiter.json"
    word_level.save(str(path))
    with pytest.raises(ValueError, match="no_delimiter.json.*step delimiter"):
        TextTokenizer.from_file(str(path))


def test_missing_file_and_missing_eos_are_reported_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        TextTokenizer.from_file(str(tmp_path / "nowhere.json"))
    path = tmp_path / "no_eos.json"
    path.write_text(_tiny_byte_level_bpe([]).to_str().replace("<|endoftext|>", "<a>").replace("<|im_end|>", "<b>"))
    with pytest.raises(ValueError, match="no_eos.json.*eos"):
        TextTokenizer.from_file(str(path))
