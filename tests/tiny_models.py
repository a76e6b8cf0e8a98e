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
_IDS = dict(vocab_size=VOCAB_SIZE, bos_token_id=2, eos_token_id=3, pad_token_id=0)
# The Llama-style field names most decoders share: 2 layers, hidden 64, 4 query heads over 2 KV heads (grouped).
_DECODER = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    initializer_range=0.2,
    **_IDS,
)
# A window shorter than the parity test's sequences (prompt + 24 new tokens), so the window really cuts.
SLIDING_WINDOW = 12

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
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=SLIDING_WINDOW)),
    "mixtral": ("MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(_DECODER)),
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=16)),
    "phi3": ("Phi3Config", dict(_DECODER)),
    "gemma": ("GemmaConfig", dict(_DECODER, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        dict(
            _DECODER,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=SLIDING_WINDOW,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            initializer_range=0.2,
            **_IDS,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, initializer_range=0.2, **_IDS),
    ),
    "opt": (
        "OPTConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            ffn_dim=128,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            init_std=0.2,
            **_IDS,
        ),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            initializer_range=0.2,
            max_position_embeddings=256,
            **_IDS,
        ),
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, multi_query=True, initializer_range=0.2, **_IDS),
    ),
    "starcoder2": ("Starcoder2Config", dict(_DECODER, sliding_window=SLIDING_WINDOW)),
    "granite": (
        "GraniteConfig",
        dict(_DECODER, embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0),
    ),
    "olmo": ("OlmoConfig", dict(_DECODER, clip_qkv=3.0)),
    "stablelm": ("StableLmConfig", dict(_DECODER)),
    "bloom": ("BloomConfig", dict(n_layer=2, hidden_size=64, n_head=4, initializer_range=0.2, **_IDS)),
    "codegen": (
        "CodeGenConfig",
        dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, n_ctx=256, initializer_range=0.2, **_IDS),
    ),
    # -- beyond the required list: what transformers ships and comes for free ------------------------------------
    "phi": ("PhiConfig", dict(_DECODER, num_key_value_heads=4)),
    "persimmon": ("PersimmonConfig", dict(_DECODER, qk_layernorm=True)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(_DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "olmo2": ("Olmo2Config", dict(_DECODER)),
    "olmoe": ("OlmoeConfig", dict(_DECODER, num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            _DECODER,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "cohere": ("CohereConfig", dict(_DECODER)),
    "cohere2": (
        "Cohere2Config",
        dict(_DECODER, sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=SLIDING_WINDOW,
            max_position_embeddings=256,
            initializer_range=0.2,
            **_IDS,
        ),
    ),
    "mpt": (
        "MptConfig",
        dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, expansion_ratio=2, initializer_range=0.2, **_IDS),
    ),
    "nemotron": ("NemotronConfig", dict(_DECODER, head_dim=16)),
    "helium": ("HeliumConfig", dict(_DECODER, head_dim=16)),
    "glm": ("GlmConfig", dict(_DECODER, head_dim=16)),
    "smollm3": ("SmolLM3Config", dict(_DECODER)),
    "ministral": (
        "MinistralConfig",
        dict(_DECODER, head_dim=16, sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
    "arcee": ("ArceeConfig", dict(_DECODER)),
    "exaone4": ("Exaone4Config", dict(_DECODER, sliding_window=SLIDING_WINDOW, sliding_window_pattern=2)),
    "apertus": (  # llama3-scaled rotary frequencies
        "ApertusConfig",
        dict(
            _DECODER,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                original_max_position_embeddings=64,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
            ),
        ),
    ),
    "ernie4_5": ("Ernie4_5Config", dict(_DECODER, head_dim=16)),
    "seed_oss": ("SeedOssConfig", dict(_DECODER, head_dim=16)),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", dict(_DECODER, head_dim=16)),
    "falcon_alibi": (
        "FalconConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            alibi=True,
            multi_query=False,
            parallel_attn=False,
            initializer_range=0.2,
            max_position_embeddings=256,
            **_IDS,
        ),
    ),
    # -- expected to fail: no per-layer [batch, kv_heads, seq, head_dim] KV cache, or masks the pass cannot rebuild
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            _DECODER,
            head_dim=16,
            intermediate_size_mlp=128,
            num_local_experts=2,
            attention_chunk_size=8,
            no_rope_layers=[1, 0],
        ),
    ),
    "llama_bidirectional": ("LlamaConfig", dict(_DECODER, is_causal=False)),
    "jamba": (
        "JambaConfig",
        dict(_DECODER, num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, mamba_d_state=4),
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
