"""Prompt formats: chat templates render and encode exactly as transformers' apply_chat_template does."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from metastone_jax.data import ArithmeticTask, TextTokenizer, build_arithmetic_tokenizer
from metastone_jax.data.prompts import DEFAULT_INSTRUCTION, PromptFormat
from metastone_jax.models.sprm import step_score_mask
from metastone_jax.rollout import encode_prompts, sft_batch

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# The DeepSeek-R1-Distill-Qwen template (tokenizer_config.json after its January 2025 update), tool branches
# included, written out here so that the test does not depend on a download.
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
# A QwQ-style ChatML template, with the helpers transformers provides (tojson, raise_exception, loop controls) and
# a {% generation %} block, in the multi-line layout that trim_blocks / lstrip_blocks exist for.
CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' + (tools | tojson) + '<|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
<think>
{% endif %}"""
# Qwen2's (and so the R1-Qwen distills') pre-tokenizer pattern: ".\n\n" is one piece wherever it stands.
QWEN2_PRE_TOKENIZER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QUESTIONS = ["What is 7 + 5?", "Let $f(x)=x^2$. Find $f(3)$.\n\nGive a number.", "Ünïcödé ∑ question 12 * 3"]


def _byte_level_bpe(special: list[str], added: list[str]) -> tokenizers.Tokenizer:
    """A Qwen2-style byte-level BPE with DeepSeek-style added tokens, built independently of the library."""
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRE_TOKENIZER), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    corpus = ["First add the numbers.\n\nThen multiply them.\n\nSo the answer is 12.\n\n", *QUESTIONS] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    bpe.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    bpe.add_tokens([AddedToken(token, normalized=False, special=False) for token in added])
    return bpe


@pytest.fixture(scope="module")
def r1_distill_dir(tmp_path_factory):
    """tokenizer.json + tokenizer_config.json laid out like DeepSeek-R1-Distill-Qwen's, BOS post-processor included."""
    path = tmp_path_factory.mktemp("r1_distill")
    bpe = _byte_level_bpe([BOS, EOS], ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"])
    # Like the real tokenizer.json: encoding with special tokens on prepends BOS (apply_chat_template turns it off).
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bpe.token_to_id(BOS))])
    bpe.save(str(path / "tokenizer.json"))
    added_token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {**added_token, "content": BOS},
        "eos_token": {**added_token, "content": EOS},
        "pad_token": {**added_token, "content": EOS},
        "unk_token": None,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": R1_DISTILL_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatml")
    bpe = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"])
    bpe.save(str(path / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(CHATML_TEMPLATE)  # transformers' newer layout: the template alone
    return path


def _transformers_prompt_ids(directory, content: str) -> tuple[str, list[int]]:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    messages = [{"role": "user", "content": content}]
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return text, list(ids)


@pytest.mark.parametrize("layout", ["r1_distill_dir", "chatml_dir"])
@pytest.mark.parametrize("question", QUESTIONS)
def test_templated_prompt_text_and_ids_equal_transformers_apply_chat_template(layout, question, request):
    directory = request.getfixturevalue(layout)
    tokenizer = TextTokenizer.from_file(str(directory))
    text = tokenizer.prompt_format.render(question)
    expected_text, expected_ids = _transformers_prompt_ids(directory, f"{question}\n{DEFAULT_INSTRUCTION}")
    assert text == expected_text
    assert tokenizer.encode(text) == expected_ids


def test_r1_distill_prompt_starts_with_one_bos_and_ends_inside_the_opened_think(r1_distill_dir):
    tokenizer = TextTokenizer.from_file(str(r1_distill_dir))
    reference = tokenizers.Tokenizer.from_file(str(r1_distill_dir / "tokenizer.json"))
    ids, _ = encode_prompts(tokenizer, ["What is 7 + 5?"])
    prompt = [int(i) for i in ids[0] if i != tokenizer.pad_id]
    bos, think = reference.token_to_id(BOS), reference.token_to_id("<think>")
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert prompt[-2:] == [think, reference.token_to_id("\u010a")]  # "<think>", then the byte-level "\n"
    for marker in ("<｜User｜>", "<｜Assistant｜>"):
        assert prompt.count(reference.token_to_id(marker)) == 1


def test_step_rules_see_the_think_the_template_opened(r1_distill_dir):
    """A response to a template that ends in <think> has steps from its first token up to its </think>."""
    tokenizer = TextTokenizer.from_file(str(r1_distill_dir))
    assert tokenizer.think_ids == (tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>"))
    prompt = tokenizer.encode(tokenizer.prompt_format.render("What is 7 + 5 then times 3?"))
    steps = ["First add the numbers", "Then multiply them", "So the answer is 36"]
    response = tokenizer.encode("".join(step + ".\n\n" for step in steps) + "</think> 36")
    tokens = np.array([prompt + response])
    response_mask = np.array([[False] * len(prompt) + [True] * len(response)])
    marked = np.flatnonzero(
        np.asarray(step_score_mask(tokens, tokenizer.delimiter_ids, *tokenizer.think_ids, response_mask=response_mask))
    )
    # Independently: the last token of each step is the one before where each ".\n\n" starts in the response.
    expected, offset = [], len(prompt)
    for step in steps:
        offset += len(tokenizer.encode(step))
        expected.append(offset - 1)
        offset += len(tokenizer.delimiter_ids)
    assert tokenizer.encode("".join(step + ".\n\n" for step in steps)) == [
        i for step in steps for i in tokenizer.encode(step) + list(tokenizer.delimiter_ids)
    ]
    assert marked.tolist() == expected


def test_instruction_is_configurable_and_empty_turns_it_off(r1_distill_dir):
    tokenizer = TextTokenizer.from_file(str(r1_distill_dir))
    assert (
        tokenizer.prompt_format.render("Q?", "Answer briefly.")
        == f"{BOS}<｜User｜>Q?\nAnswer briefly.<｜Assistant｜><think>\n"
    )
    assert tokenizer.prompt_format.render("Q?", "") == f"{BOS}<｜User｜>Q?<｜Assistant｜><think>\n"


def test_embedded_task_and_untemplated_tokenizers_keep_the_plain_format():
    tokenizer = build_arithmetic_tokenizer(ArithmeticTask())
    assert tokenizer.prompt_format.render("1 + 2") == "1 + 2\n"
    assert tokenizer.prompt_format.render("1 + 2", "Be brief.") == "1 + 2\nBe brief.\n"
    ids, mask = encode_prompts(tokenizer, ["1 + 2", "3 * 4 - 5"])
    assert [i for i, m in zip(ids[0], mask[0]) if m] == tokenizer.encode("1 + 2\n")
    batch = sft_batch(tokenizer, ["1 + 2"], [ArithmeticTask().sample(0)["solution"]])
    assert [i for i, m in zip(batch["tokens"][0], batch["attention_mask"][0]) if m][:4] == tokenizer.encode("1 + 2\n")


def test_saved_tokenizer_reloads_with_its_template_and_special_tokens(r1_distill_dir, tmp_path):
    tokenizer = TextTokenizer.from_file(str(r1_distill_dir))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    reloaded = TextTokenizer.from_file(str(tmp_path))
    assert reloaded.prompt_format.render("Q?") == tokenizer.prompt_format.render("Q?")
    assert (reloaded.eos_id, reloaded.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
    _, expected_ids = _transformers_prompt_ids(tmp_path, f"Q?\n{DEFAULT_INSTRUCTION}")
    assert reloaded.encode(reloaded.prompt_format.render("Q?")) == expected_ids


def test_broken_templates_are_reported_with_their_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_config.json.*not valid Jinja"):
        PromptFormat.from_tokenizer_config({"chat_template": "{% if %}"}, str(tmp_path))
    with pytest.raises(ValueError, match="none named 'default'"):
        PromptFormat.from_tokenizer_config({"chat_template": [{"name": "tool_use", "template": "x"}]}, str(tmp_path))
    failing = PromptFormat.from_tokenizer_config({"chat_template": "{{ raise_exception('no users') }}"}, str(tmp_path))
    with pytest.raises(ValueError, match="failed to render a question: no users"):
        failing.render("Q?")
