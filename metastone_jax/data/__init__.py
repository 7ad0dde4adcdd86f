"""Data: the embedded arithmetic task, tokenizers and prompt formats, the answer verifier and grain pipelines."""

from metastone_jax.data.arithmetic import (
    STEP_DELIMITER,
    THINK_CLOSE,
    THINK_OPEN,
    ArithmeticTask,
    format_prompt,
    format_response,
)
from metastone_jax.data.pipeline import arithmetic_dataset, file_dataset, load_records, pad_batch
from metastone_jax.data.prompts import DEFAULT_INSTRUCTION, PromptFormat
from metastone_jax.data.tokenizer import TextTokenizer, build_arithmetic_tokenizer
from metastone_jax.data.verify import (
    equivalences,
    extract_answer,
    extract_answers,
    extract_boxed,
    is_equivalent,
    reward,
    rewards,
    start_workers,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "STEP_DELIMITER",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ArithmeticTask",
    "PromptFormat",
    "TextTokenizer",
    "arithmetic_dataset",
    "build_arithmetic_tokenizer",
    "equivalences",
    "extract_answer",
    "extract_answers",
    "extract_boxed",
    "file_dataset",
    "format_prompt",
    "format_response",
    "is_equivalent",
    "load_records",
    "pad_batch",
    "reward",
    "rewards",
    "start_workers",
]
