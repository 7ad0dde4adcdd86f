"""One tokenizer interface for the locally built arithmetic vocabulary and real Hugging Face tokenizer.json files."""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from metastone_jax.data.arithmetic import STEP_DELIMITER, THINK_CLOSE, THINK_OPEN, ArithmeticTask
from metastone_jax.data.prompts import TEMPLATE_TOKENS, PromptFormat

# Looked up in this order when no tokenizer_config.json names them: our own, Qwen2 base/chat, DeepSeek-R1
# distills, Llama-style.
_EOS_CANDIDATES = ("<eos>", "<|endoftext|>", "<|im_end|>", "<｜end▁of▁sentence｜>", "</s>")
_PAD_CANDIDATES = ("<pad>", "<|endoftext|>", "<｜end▁of▁sentence｜>")
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
_MARKERS = (THINK_OPEN, THINK_CLOSE, STEP_DELIMITER)
# A piece is a number or one symbol, each optionally carrying the space before it, or one whitespace
# character: "7 + 5" -> "7", " +", " 5". Keeping the space inside the piece makes decoding exact without a
# separate space token that would double the sequence length.
_PIECE_PATTERN = r" ?\d+| ?[^\s\d]|\s"


class TextTokenizer:
    """encode/decode plus the ids the library needs (pad, eos, think markers, step delimiter) and the prompt format
    of its model (`prompt_format`: plain, or the chat template of its tokenizer_config.json)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        source: str = "<in memory>",
        eos_token: str | None = None,
        pad_token: str | None = None,
        prompt_format: PromptFormat | None = None,
    ):
        self._tokenizer = tokenizer
        self.source = source
        self.prompt_format = prompt_format or PromptFormat()
        self.eos_id = self._find_id("eos", eos_token, _EOS_CANDIDATES)
        self.pad_id = self._find_id("pad", pad_token, _PAD_CANDIDATES, fallback=self.eos_id)
        open_id, close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
        self.think_ids: tuple[int, int] | None = None if open_id is None or close_id is None else (open_id, close_id)
        self.delimiter_ids: tuple[int, ...] = self._delimiter_ids()

    @classmethod
    def from_file(cls, path: str, *, eos_token: str | None = None, pad_token: str | None = None) -> TextTokenizer:
        """Loads a tokenizer.json (file or directory); eos/pad come from the arguments, a sibling
        tokenizer_config.json, or well-known names, in that order; the chat template from that directory."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"cannot read tokenizer file {path}: {error}") from error
        directory = os.path.dirname(path)
        config = _read_tokenizer_config(os.path.join(directory, "tokenizer_config.json"))
        return cls(
            tokenizer,
            source=path,
            eos_token=eos_token or config.get("eos_token"),
            pad_token=pad_token or config.get("pad_token"),
            prompt_format=PromptFormat.from_tokenizer_config(config, directory),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (pad, eos) are dropped by default, think markers are kept."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, or None."""
        return self._tokenizer.token_to_id(token)

    def save(self, path: str) -> None:
        """Writes the tokenizer as a Hugging Face tokenizer.json, and a tokenizer_config.json beside it with the
        eos/pad names and the chat template, so that `from_file` reloads the same ids and prompts."""
        self._tokenizer.save(path)
        config = {
            **self.prompt_format.tokenizer_config(),
            # The ids this tokenizer resolved win over the template's variables of the same name.
            "eos_token": self._tokenizer.id_to_token(self.eos_id),
            "pad_token": self._tokenizer.id_to_token(self.pad_id),
        }
        with open(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, ensure_ascii=False)

    def _find_id(
        self, role: str, requested: str | None, candidates: tuple[str, ...], fallback: int | None = None
    ) -> int:
        if requested is not None:
            token_id = self._tokenizer.token_to_id(requested)
            if token_id is None:
                raise ValueError(f"tokenizer {self.source} has no {role} token {requested!r}")
            return token_id
        for candidate in candidates:
            token_id = self._tokenizer.token_to_id(candidate)
            if token_id is not None:
                return token_id
        if fallback is not None:
            return fallback
        raise ValueError(
            f"tokenizer {self.source} has none of the {role} tokens {list(candidates)}; pass {role}_token= to name it"
        )

    def _delimiter_ids(self) -> tuple[int, ...]:
        ids = self.encode(STEP_DELIMITER)
        unknown_id = self._tokenizer.token_to_id("<unk>")
        if not ids or unknown_id in ids or self.decode(ids, skip_special_tokens=False) != STEP_DELIMITER:
            raise ValueError(
                f"tokenizer {self.source} cannot encode the step delimiter {STEP_DELIMITER!r} "
                f"(got ids {ids}); the SPRM needs it to find reasoning steps"
            )
        return tuple(ids)


def build_arithmetic_tokenizer(task: ArithmeticTask) -> TextTokenizer:
    """A word-level tokenizer whose vocabulary covers every text the task can produce, each number one id."""
    pieces = ["\n", " "]
    for word in task.vocabulary():
        pieces += [word, " " + word]
    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS + _MARKERS + tuple(pieces))}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in _SPECIAL_TOKENS])
    # Markers are matched before pre-tokenization so each stays one id; not special, so decode keeps them.
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in _MARKERS])
    return TextTokenizer(tokenizer, source=f"arithmetic tokenizer (max_value={task.max_value})")


def _read_tokenizer_config(path: str) -> dict:
    """A Hugging Face tokenizer_config.json ({} when there is none), special tokens given by their text."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read tokenizer config {path}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer config {path} is not a JSON object")
    for key in TEMPLATE_TOKENS:
        value = config.pop(key, None)
        if isinstance(value, dict):  # older configs store an AddedToken dict
            value = value.get("content")
        if isinstance(value, str):
            config[key] = value
    return config
