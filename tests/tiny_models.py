"""Tiny seeded random models and an offline word-level tokenizer for tests."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "my name is the a an and of to in on for with at by from up about into over after hello world hi there "
    "what where when who how why capital france paris city river blue green red one two three four five six "
    "seven eight nine ten cat dog bird fish tree house car road sun moon star sky sea"
).split()
VOCAB_SIZE = 128
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]

# Small but not degenerate: a larger init scale than transformers' default keeps logits peaked enough that greedy
# choices are not decided by float noise.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": (
        "GPT2Config",
        dict(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=256,
            vocab_size=VOCAB_SIZE,
            initializer_range=0.2,
            bos_token_id=2,
            eos_token_id=3,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=256,
            initializer_range=0.2,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        ),
    ),
}


def make_tiny_model(arch: str, seed: int = 0):
    import torch
    import transformers

    config_name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def make_tokenizer(directory: Path):
    """A whitespace word-level tokenizer over ``WORDS`` (ids < VOCAB_SIZE), saved and reloaded like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    # every id the model can produce decodes to something readable
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
