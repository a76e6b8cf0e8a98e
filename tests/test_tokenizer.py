"""qgraph.load_tokenizer: the checkpoint's own tokenizer.json without transformers, giving AutoTokenizer's ids.

Compared with transformers' ``AutoTokenizer`` on the same directory: encoded ids (with and without special tokens),
decoded text, special token ids, and chat-template ids (``add_generation_prompt=True``). A process that generates
from a cached artifact with it imports neither transformers nor torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qgraph.errors import QGraphError
from qgraph.tokenizer import load_tokenizer
from tests.test_text_output import MULTIBYTE, make_byte_level_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path("~/.cache/qgraph/weights/smollm2-135m-instruct-hf").expanduser()
TEXTS = ["the capital of france is", "  two  spaces and\nnew lines ", MULTIBYTE, "<s> inline special </s>", ""]
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of france?"},
]


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    make_byte_level_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def directories(byte_level_dir, tokenizer, tmp_path_factory):
    """Byte-level BPE with a chat template, word-level, and SmolLM2's real tokenizer where the demo converted it."""
    word_level = tmp_path_factory.mktemp("word-level")
    tokenizer.save_pretrained(word_level)
    return [byte_level_dir, word_level] + ([SMOLLM2] if (SMOLLM2 / "tokenizer.json").is_file() else [])


def test_ids_and_text_equal_autotokenizer(directories):
    for directory in directories:
        ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
        for text in TEXTS:
            assert ours(text)["input_ids"] == theirs(text)["input_ids"], (directory, text)
            assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
            ids = theirs(text)["input_ids"]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            assert getattr(ours, name) == getattr(theirs, name), (directory, name)


def test_chat_template_ids_equal_autotokenizer(directories):
    with_templates = [d for d in directories if AutoTokenizer.from_pretrained(d).chat_template]
    assert with_templates, "the byte-level tokenizer has a chat template"
    for directory in with_templates:
        ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
        for add in (True, False):
            expected = theirs.apply_chat_template(CONVERSATION, add_generation_prompt=add, tokenize=False)
            assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add, tokenize=False) == expected
            ids = theirs.apply_chat_template(CONVERSATION, add_generation_prompt=add, tokenize=True, return_dict=False)
            assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add) == list(ids)


def test_a_tokenizer_without_tokenizer_json_or_template_is_named(tmp_path, tokenizer, byte_level_dir):
    with pytest.raises(QGraphError, match=r"has no tokenizer.json; load this tokenizer with transformers"):
        load_tokenizer(tmp_path)
    word_level = tmp_path / "word"
    tokenizer.save_pretrained(word_level)
    with pytest.raises(QGraphError, match="has no chat template"):
        load_tokenizer(word_level).apply_chat_template(CONVERSATION)


GENERATE_WITHOUT_TRANSFORMERS = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
for graph_library in ("onnx", "onnx_ir", "onnxscript"):  # finding a cached artifact needs no graph library either
    sys.modules[graph_library] = None
from qgraph import QEFFAutoModelForCausalLM
from qgraph.tokenizer import load_tokenizer
model_dir, cache_dir, tokenizer_dir = sys.argv[1:4]
model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=cache_dir, verbose=False)
model.compile(prefill_seq_len=8, ctx_len=64)
print(model.generate(load_tokenizer(tokenizer_dir), ["my name is"], generation_len=12, verbose=False).generated_ids[0])
"""


def test_generate_from_a_cached_artifact_without_transformers_or_graph_libraries(tiny_model_dir, tokenizer, tmp_path):
    from qgraph import QEFFAutoModelForCausalLM

    model_dir, cache = tiny_model_dir("llama"), tmp_path / "cache"
    model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=cache, verbose=False)
    model.compile(prefill_seq_len=8, ctx_len=64)
    expected = model.generate(tokenizer, ["my name is"], generation_len=12, verbose=False).generated_ids[0]
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    done = subprocess.run(
        [sys.executable, "-c", GENERATE_WITHOUT_TRANSFORMERS, str(model_dir), str(cache), str(tmp_path / "tokenizer")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(expected)
