"""Text out of generate: stop strings cut where transformers' ``stop_strings`` stops, chat templates, streaming.

A byte-level BPE tokenizer (GPT-2 style, trained here offline) makes tokens that split multi-byte characters and
words, so stop strings can span tokens and streaming must hold back partial characters.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from qgraph import QEFFAutoModelForCausalLM
from qgraph.errors import QGraphError
from qgraph.stopping import TextTracker
from tests.tiny_models import TINY_CONFIGS, WORDS

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PROMPT = "the capital of france is"
MULTIBYTE = "日本 café 🙂 naïve"


def make_byte_level_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]  # ASCII only: CJK stays bytes
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>", "<s>", "</s>"]
    )
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory, cache_dir):
    tok = make_byte_level_tokenizer(tmp_path_factory.mktemp("bpe-tokenizer"))
    _, kwargs = TINY_CONFIGS["llama"]
    config = LlamaConfig(**(kwargs | dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    directory = tmp_path_factory.mktemp("tiny-llama-bpe")
    hf.save_pretrained(directory)
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=96, batch_size=2)
    return tok, hf, qg


def _hf_ids(hf, tok, prompt, new_tokens, **kwargs):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def _spanning_stop_string(tok, ids) -> tuple[str, int]:
    """A 4-character string of the greedy text whose first occurrence spans the boundary of two tokens."""
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    text = tok.decode(ids)
    for i in range(3, len(ids) - 1):
        cut = ends[i]
        candidate = text[cut - 2 : cut + 2]
        if (
            len(candidate) == 4
            and candidate.isascii()
            and candidate.strip() == candidate
            and ends[i - 1] <= cut - 2
            and ends[i + 1] >= cut + 2
            and text.find(candidate) == cut - 2
        ):
            return candidate, i + 1
    raise AssertionError(f"no ASCII 4-character string spans two tokens in {text!r}")


def test_stop_string_spanning_two_tokens_cuts_where_hf_stop_strings_stops(byte_level):
    tok, hf, qg = byte_level
    free = _hf_ids(hf, tok, PROMPT, 40)
    stop, stop_token = _spanning_stop_string(tok, free)
    expected_ids = _hf_ids(hf, tok, PROMPT, 40, stop_strings=[stop], tokenizer=tok)
    assert len(expected_ids) == stop_token + 1, "transformers stops at the token that completes the stop string"
    result = qg.generate(tok, [PROMPT], max_new_tokens=40, stop=[stop], verbose=False)
    assert result.generated_ids[0] == expected_ids
    full = tok.decode(expected_ids, skip_special_tokens=True)
    assert full.endswith(stop), "here the completing token ends with the stop string"
    assert result.generated_texts[0] == full[: full.index(stop)]
    assert result.finish_reasons == ["stop"]


def test_stop_strings_per_prompt_in_a_batch_and_the_earliest_one_wins(byte_level):
    tok, hf, qg = byte_level
    other = "hello world"
    free = [_hf_ids(hf, tok, p, 30) for p in (PROMPT, other)]
    texts = [tok.decode(ids) for ids in free]
    late, early = texts[0][12:15], texts[0][6:9]
    result = qg.generate(tok, [PROMPT, other], max_new_tokens=30, stop=[late, early], verbose=False)
    first = min(texts[0].find(late), texts[0].find(early))
    assert result.generated_texts[0] == texts[0][:first]
    for ids, text, got_ids, got_text in zip(free, texts, result.generated_ids, result.generated_texts, strict=True):
        assert got_ids == ids[: len(got_ids)] and text.startswith(got_text)


def test_chat_messages_give_the_chat_template_ids(byte_level):
    tok, hf, qg = byte_level
    conversations = [
        [{"role": "user", "content": "what is the capital of france"}],
        [{"role": "system", "content": "one two"}, {"role": "user", "content": "hello"}],
    ]
    result = qg.generate(tok, messages=conversations, max_new_tokens=6, verbose=False)
    for conversation, length, ids in zip(conversations, result.prompt_lengths, result.generated_ids, strict=True):
        template_ids = tok.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
        assert length == len(template_ids)
        with torch.no_grad():
            out = hf.generate(torch.tensor([template_ids]), max_new_tokens=6, do_sample=False)
        assert ids == out[0, len(template_ids) :].tolist()
    one = qg.generate(tok, messages=conversations[0], max_new_tokens=6, verbose=False)
    assert one.generated_ids == result.generated_ids[:1]


def test_chat_without_a_template_is_a_clear_error(byte_level, tokenizer):
    _, _, qg = byte_level
    with pytest.raises(QGraphError, match="no chat template"):
        qg.generate(tokenizer, messages=[{"role": "user", "content": "hi"}], verbose=False)


def test_text_increments_never_split_a_character_and_join_to_the_text(byte_level):
    tok, _, _ = byte_level
    ids = tok(MULTIBYTE)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids), "some character must be split across tokens"
    tracker = TextTracker(tok)
    pieces = []
    for token in ids:
        tracker.add(token)
        pieces.append(tracker.increment())
    pieces.append(tracker.increment(finished=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE


def test_text_increments_hold_back_a_possible_stop_string(byte_level):
    tok, _, _ = byte_level
    ids = tok("one two three four")["input_ids"]
    tracker = TextTracker(tok, stop=("ee fo",))
    pieces = []
    for token in ids:
        stopped = tracker.add(token)
        pieces.append(tracker.increment())
        if stopped:
            break
    assert stopped and "".join(pieces) == "one two thr"


def test_stream_events_join_to_the_generate_text(byte_level):
    tok, _, qg = byte_level
    options = dict(max_new_tokens=30, do_sample=True, temperature=1.5, seed=4)
    expected = qg.generate(tok, [PROMPT], verbose=False, **options)
    events = list(qg.stream(tok, PROMPT, **options))
    assert "".join(e.text for e in events) == expected.generated_texts[0]
    assert [t for e in events for t in e.token_ids] == expected.generated_ids[0]
    assert all(e.finish_reason is None and e.stats is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason == expected.finish_reasons[0] and last.finish_reason in ("eos", "length")
    assert last.stats.generated_tokens == len(expected.generated_ids[0]) and last.stats.ttft_s > 0


def test_stream_with_a_stop_string_never_shows_it(byte_level):
    tok, _, qg = byte_level
    text = qg.generate(tok, [PROMPT], max_new_tokens=30, verbose=False).generated_texts[0]
    stop = text[10:13]
    events = list(qg.stream(tok, PROMPT, max_new_tokens=30, stop=stop))
    shown = "".join(e.text for e in events)
    assert shown == text[: text.index(stop)] and events[-1].finish_reason == "stop"


def test_a_stream_left_early_frees_the_model(byte_level):
    tok, _, qg = byte_level
    stream = qg.stream(tok, PROMPT, max_new_tokens=20)
    next(stream)
    stream.close()
    assert len(qg.generate(tok, [PROMPT], max_new_tokens=3, verbose=False).generated_ids[0]) == 3


def test_without_stop_strings_the_text_is_decoded_when_read_not_at_every_token(byte_level):
    """A non-streamed request without stop strings decodes its tokens once, at the end, to the same text."""
    tok, _, _ = byte_level
    decoded: list[int] = []

    class CountingTokenizer:
        def decode(self, ids, **options):
            decoded.append(len(ids))
            return tok.decode(ids, **options)

    ids = tok(MULTIBYTE)["input_ids"]
    tracker = TextTracker(CountingTokenizer())
    assert not any(tracker.add(token) for token in ids)
    assert decoded == []
    assert tracker.final_text == tracker.text == MULTIBYTE
    assert decoded == [len(ids)]
