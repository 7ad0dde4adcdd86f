"""grain pipelines: determinism, process sharding, iterator resume, file loading and its error messages, padding."""

import itertools
import json

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from metastone_jax.data.arithmetic import ArithmeticTask
from metastone_jax.data.pipeline import arithmetic_dataset, file_dataset, load_records, pad_batch

TASK = ArithmeticTask(seed=4)


def _take(dataset, count):
    return list(itertools.islice(iter(dataset), count))


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _numbered_records(tmp_path, count):
    """A JSONL file whose record k has question "q{k}" and answer str(k)."""
    rows = [json.dumps({"question": f"q{k}", "answer": str(k)}) for k in range(count)]
    return _write_jsonl(tmp_path / "numbered.jsonl", rows)


def test_arithmetic_batches_are_problems_in_index_order_of_the_shard():
    batches = _take(arithmetic_dataset(TASK, 3, shard_index=1, shard_count=2), 2)
    expected = [TASK.sample(i) for i in (1, 3, 5, 7, 9, 11)]
    got = [{key: batch[key][row] for key in batch} for batch in batches for row in range(3)]
    assert got == expected


def test_arithmetic_pipeline_is_deterministic_and_defaults_to_the_single_process_shard():
    first = _take(arithmetic_dataset(TASK, 4, shard_index=0, shard_count=1), 3)
    second = _take(arithmetic_dataset(ArithmeticTask(seed=4), 4), 3)
    assert first == second


def test_arithmetic_shards_are_disjoint_and_cover_every_problem():
    questions = []
    for shard in range(4):
        for batch in arithmetic_dataset(TASK, 2, num_examples=24, shard_index=shard, shard_count=4):
            questions += batch["question"]
    assert sorted(questions) == sorted(TASK.sample(i)["question"] for i in range(24))


def test_file_shards_are_disjoint_and_cover_one_shuffled_epoch(tmp_path):
    path = _numbered_records(tmp_path, 24)
    per_shard = [
        [
            answer
            for batch in file_dataset(path, 2, shuffle_seed=7, shard_index=shard, shard_count=3)
            for answer in batch["answer"]
        ]
        for shard in range(3)
    ]
    assert sorted(itertools.chain(*per_shard), key=int) == [str(k) for k in range(24)]
    assert per_shard[0] != [str(k) for k in range(0, 24, 3)]  # the epoch was shuffled before sharding


def test_each_epoch_is_a_new_permutation_of_all_records(tmp_path):
    path = _numbered_records(tmp_path, 20)
    answers = [
        a
        for batch in file_dataset(path, 5, shuffle_seed=1, num_epochs=2, shard_index=0, shard_count=1)
        for a in batch["answer"]
    ]
    first, second = answers[:20], answers[20:]
    assert sorted(first, key=int) == sorted(second, key=int) == [str(k) for k in range(20)]
    assert first != second


@pytest.mark.parametrize("make_dataset", ["arithmetic", "file"])
def test_restored_iterator_state_continues_with_the_same_batches(tmp_path, make_dataset):
    if make_dataset == "arithmetic":
        dataset = arithmetic_dataset(TASK, 3, shard_index=0, shard_count=2)
    else:
        dataset = file_dataset(_numbered_records(tmp_path, 10), 3, num_epochs=None, shard_index=0, shard_count=1)
    iterator = iter(dataset)
    _ = [next(iterator) for _ in range(5)]  # crosses an epoch boundary for the 10-record file
    state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(dataset)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(4)] == expected


def test_jsonl_with_custom_fields_and_answer_conventions(tmp_path):
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"problem": "How many?", "solution": "She has 3 + 4 = 7.\n#### 1,207"}),
            "",
            json.dumps({"problem": "Area?", "solution": "So the area is $\\boxed{\\frac{1}{2}}$."}),
            json.dumps({"problem": "Plain?", "solution": " 42 "}),
            json.dumps({"problem": "Number?", "solution": 5}),
        ],
    )
    records = load_records(path, question_field="problem", answer_field="solution")
    assert records == [
        {"question": "How many?", "answer": "1,207"},
        {"question": "Area?", "answer": "\\frac{1}{2}"},
        {"question": "Plain?", "answer": "42"},
        {"question": "Number?", "answer": "5"},
    ]
    plain = load_records(path, question_field="problem", answer_field="solution", answer_format="plain")
    assert plain[0]["answer"] == "She has 3 + 4 = 7.\n#### 1,207"


def test_parquet_records_load_like_jsonl(tmp_path):
    path = str(tmp_path / "train.parquet")
    pyarrow.parquet.write_table(
        pyarrow.table({"question": ["a?", "b?"], "answer": ["x #### 3", "4"], "extra": [1, 2]}), path
    )
    assert load_records(path) == [{"question": "a?", "answer": "3"}, {"question": "b?", "answer": "4"}]
    with pytest.raises(ValueError, match=r"train\.parquet.*missing column.*'prompt'"):
        load_records(path, question_field="prompt")
    bad = str(tmp_path / "bad.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"question": ["a?", None], "answer": ["1", "2"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet, row 2: field 'question'"):
        load_records(bad)


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"question": "a", "answer": "1"}', '{"question": "b", "answer": "2"}', '{"question": oops}'],
            r"bad\.jsonl, line 3: invalid JSON",
        ),
        (['{"question": "a", "answer": "1"}', '{"question": "b"}'], r"bad\.jsonl, line 2: missing field 'answer'"),
        (['{"question": 7, "answer": "1"}'], r"bad\.jsonl, line 1: field 'question' must be a non-empty string"),
        (["", '["question", "answer"]'], r"bad\.jsonl, line 2: expected a JSON object"),
        (['{"question": "a", "answer": null}'], r"bad\.jsonl, line 1: field 'answer' must be a string or number"),
    ],
)
def test_malformed_lines_are_reported_with_file_and_line_number(tmp_path, lines, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_records(path)


def test_forced_gsm8k_format_reports_the_line_without_a_marker(tmp_path):
    path = _write_jsonl(
        tmp_path / "gsm8k.jsonl",
        ['{"question": "a", "answer": "x #### 1"}', '{"question": "b", "answer": "no marker"}'],
    )
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl, line 2: field 'answer' has no '####'"):
        load_records(path, answer_format="gsm8k")


def test_missing_empty_and_unsupported_files_are_reported_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_records(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        load_records(_write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="data.csv has an unsupported extension"):
        load_records(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="answer_format 'latex'"):
        load_records(str(tmp_path / "data.csv"), answer_format="latex")


def test_too_few_records_for_one_batch_per_shard_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        file_dataset(_numbered_records(tmp_path, 6), 4, shard_index=0, shard_count=2)


def _reference_pad(sequences, pad_id, length, side):
    ids = [[pad_id] * length for _ in sequences]
    mask = [[False] * length for _ in sequences]
    for row, sequence in enumerate(sequences):
        offset = length - len(sequence) if side == "left" else 0
        for position, token in enumerate(sequence):
            ids[row][offset + position] = token
            mask[row][offset + position] = True
    return np.array(ids, dtype=np.int32), np.array(mask, dtype=bool)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("length", [None, 7])
def test_pad_batch_matches_a_loop_reference(side, length):
    sequences = [[5, 6, 7], [8], [], [1, 2, 3, 4, 9]]
    ids, mask = pad_batch(sequences, pad_id=0, length=length, side=side)
    expected_ids, expected_mask = _reference_pad(sequences, 0, length or 5, side)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)


def test_pad_batch_rejects_a_length_shorter_than_a_sequence_and_a_bad_side():
    with pytest.raises(ValueError, match="does not fit the padded length 2"):
        pad_batch([[1, 2, 3]], pad_id=0, length=2)
    with pytest.raises(ValueError, match="'middle'"):
        pad_batch([[1]], pad_id=0, side="middle")
