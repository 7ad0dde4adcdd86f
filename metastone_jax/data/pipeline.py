"""grain pipelines: the embedded task and local JSONL/Parquet files to batches of sample dicts, plus padding.

A batch is a dict of lists, e.g. {"question": [...], "answer": [...]} with one entry per sample. Every
pipeline is sharded by process (each JAX process reads a disjoint slice), and its iterator supports
`get_state()`/`set_state()` so a resumed run continues with exactly the same batches.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import grain
import jax
import numpy as np
import pyarrow.parquet

from metastone_jax.data.arithmetic import ArithmeticTask
from metastone_jax.data.verify import GSM8K_MARKER, extract_boxed

ANSWER_FORMATS = ("auto", "plain", "gsm8k", "boxed")


def arithmetic_dataset(
    task: ArithmeticTask,
    batch_size: int,
    *,
    num_examples: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 1,
) -> grain.IterDataset:
    """Batches of task samples, problem i = task.sample(i); num_examples=None is an endless stream.

    These are the task's train split: no question text of the held-out eval split ever appears (data/arithmetic.py).

    Shards default to this JAX process; each shard takes every shard_count-th problem.
    """
    indices = grain.MapDataset.range(sys.maxsize if num_examples is None else num_examples)
    return _finish(indices.map(task.sample), batch_size, shard_index, shard_count, num_threads)


def file_dataset(
    path: str | Sequence[str],
    batch_size: int,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "auto",
    shuffle_seed: int | None = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 1,
) -> grain.IterDataset:
    """Batches of {"question", "answer"} read from local .jsonl / .parquet file(s) (GSM8K/MATH style).

    answer_format: "plain" keeps the field, "gsm8k" takes the text after "####", "boxed" the last \\boxed{},
    "auto" picks per record. Each epoch is shuffled anew unless shuffle_seed is None; num_epochs=None repeats
    forever. Shards default to this JAX process.
    """
    paths = [path] if isinstance(path, str) else list(path)
    records = [
        record
        for p in paths
        for record in load_records(
            p, question_field=question_field, answer_field=answer_field, answer_format=answer_format
        )
    ]
    dataset = grain.MapDataset.source(records)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)
    return _finish(dataset, batch_size, shard_index, shard_count, num_threads)


def load_records(
    path: str, *, question_field: str = "question", answer_field: str = "answer", answer_format: str = "auto"
) -> list[dict[str, str]]:
    """All {"question", "answer"} records of a .jsonl or .parquet file, validated with file:line errors."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r} is not one of {ANSWER_FORMATS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
        unit = "line"
    elif path.endswith(".parquet"):
        rows = _parquet_rows(path, (question_field, answer_field))
        unit = "row"
    else:
        raise ValueError(f"data file {path} has an unsupported extension; use .jsonl or .parquet")
    records = [
        _record(row, f"{path}, {unit} {number}", question_field, answer_field, answer_format) for number, row in rows
    ]
    if not records:
        raise ValueError(f"data file {path} holds no records")
    return records


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None, side: str = "left"
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, L] int32, mask [B, L] bool) with each sequence padded on `side`; L = longest unless given."""
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    longest = max((len(sequence) for sequence in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit the padded length {length}")
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, sequence in enumerate(sequences):
        start = length - len(sequence) if side == "left" else 0
        ids[row, start : start + len(sequence)] = sequence
        mask[row, start : start + len(sequence)] = True
    return ids, mask


def _finish(
    dataset: grain.MapDataset, batch_size: int, shard_index: int | None, shard_count: int | None, num_threads: int
) -> grain.IterDataset:
    """Shard by process, batch into dicts of lists, and hand over to a checkpointable iterator."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = dataset[shard_index::shard_count]
    if len(shard) < batch_size:
        raise ValueError(
            f"shard {shard_index} of {shard_count} holds {len(shard)} samples, fewer than one batch of {batch_size}"
        )
    batched = shard.batch(batch_size, drop_remainder=True, batch_fn=_collate)
    # Element order is fixed by the index, so threads only prefetch; the stream stays deterministic.
    return batched.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads))


def _collate(samples: Sequence[dict[str, str]]) -> dict[str, list[str]]:
    return {key: [sample[key] for sample in samples] for key in samples[0]}


def _jsonl_rows(path: str):
    """(1-based line number, parsed object) for each non-blank line."""
    number = 0
    with open(path, encoding="utf-8") as file:
        try:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, line {number + 1}: not UTF-8 text ({error.reason})") from error


def _parquet_rows(path: str, fields: tuple[str, str]):
    """(1-based row number, row dict) for each row, reading only the two needed columns."""
    try:
        schema = pyarrow.parquet.read_schema(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read Parquet file {path}: {error}") from error
    missing = [field for field in fields if field not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns present: {schema.names}")
    table = pyarrow.parquet.read_table(path, columns=list(dict.fromkeys(fields)))
    yield from enumerate(table.to_pylist(), start=1)


def _record(row, where: str, question_field: str, answer_field: str, answer_format: str) -> dict[str, str]:
    """One validated sample; `where` ("file, line N") prefixes every error."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in (question_field, answer_field):
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
    question, answer = row[question_field], row[answer_field]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field {question_field!r} must be a non-empty string, got {question!r}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"{where}: field {answer_field!r} must be a string or number, got {answer!r}")
    return {"question": question, "answer": _final_answer(answer, answer_format, where, answer_field)}


def _final_answer(answer: str, answer_format: str, where: str, answer_field: str) -> str:
    """The reference final answer inside a raw answer field, per the answer format."""
    if answer_format == "gsm8k" or (answer_format == "auto" and GSM8K_MARKER in answer):
        if GSM8K_MARKER not in answer:
            raise ValueError(f"{where}: field {answer_field!r} has no {GSM8K_MARKER!r} final-answer marker")
        answer = answer.rsplit(GSM8K_MARKER, 1)[1]
    elif answer_format == "boxed" or (answer_format == "auto" and "\\boxed" in answer):
        boxed = extract_boxed(answer)
        if boxed is None:
            raise ValueError(f"{where}: field {answer_field!r} has no complete \\boxed{{...}} answer")
        answer = boxed
    answer = answer.strip()
    if not answer:
        raise ValueError(f"{where}: field {answer_field!r} has an empty final answer")
    return answer
