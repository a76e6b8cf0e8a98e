"""Real checkpoints: the dtypes hub models ship in, lazy loading, and a key that follows the weight files.

A checkpoint saved in bfloat16 or float16 is exported in float32 (its weights upcast exactly), so qgraph's greedy
tokens must equal HF transformers' computed in float32 from the same stored weights, on ONNX Runtime and on the
Cloud AI 100 bundle's graph (run on ORT). A process that finds the compiled artifact in the cache never imports
torch, so it cannot have materialised the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from qgraph.checkpoint import resolve_checkpoint
from qgraph.errors import ModelNotFoundError, QGraphError
from qgraph.runtime import greedy_generate
from tests.bundle_on_ort import bundle_session
from tests.parity import MY_NAME, hf_greedy
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2", "gemma", "gpt2", "mistral"]
NEW_TOKENS = 16
PREFILL, CTX = 8, 64


def save_in_dtype(arch: str, dtype: torch.dtype, directory: Path) -> Path:
    make_tiny_model(arch).to(dtype).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    made: dict[tuple[str, torch.dtype], Path] = {}

    def get(arch: str, dtype: torch.dtype) -> Path:
        if (arch, dtype) not in made:
            name = f"{arch}-{str(dtype).removeprefix('torch.')}"
            made[arch, dtype] = save_in_dtype(arch, dtype, tmp_path_factory.mktemp(name))
        return made[arch, dtype]

    return get


def hf_float32_tokens(directory: Path, tokenizer, prompt: str) -> list[int]:
    """The reference: HF transformers' greedy tokens from the same stored weights upcast to float32."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    return hf_greedy(model, tokenizer, prompt, NEW_TOKENS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_checkpoint_gives_float32_tokens(arch, dtype, checkpoint_dir, tokenizer, cache_dir, tmp_path):
    directory = checkpoint_dir(arch, dtype)
    assert resolve_checkpoint(directory).stored_dtype() == str(dtype).removeprefix("torch.")
    expected = hf_float32_tokens(directory, tokenizer, MY_NAME)

    model = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=cache_dir, verbose=False)
    assert model.export_dtype == "float32"
    model.compile(backend="ort", prefill_seq_len=PREFILL, ctx_len=CTX)
    generated = model.generate(tokenizer, [MY_NAME], generation_len=NEW_TOKENS, verbose=False).generated_ids
    assert generated == [expected]

    bundle = model.compile(backend="ai100", prefill_seq_len=PREFILL, ctx_len=CTX)
    session = bundle_session(bundle, tmp_path)
    eos = {int(model.generation_config.eos_token_id)}
    on_bundle = greedy_generate(session, [tokenizer(MY_NAME)["input_ids"]], 1, NEW_TOKENS, eos)[0]
    assert on_bundle == [expected]


def test_export_dtype_is_in_the_key_and_named_when_exporting(checkpoint_dir, tmp_path, capsys):
    directory = checkpoint_dir("llama", torch.bfloat16)
    upcast = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=tmp_path)
    assert "weights are stored as" not in capsys.readouterr().err
    upcast.export()
    assert "weights are stored as bfloat16; exporting in float32" in capsys.readouterr().err
    kept = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=tmp_path, dtype="auto", verbose=False)
    assert kept.export_dtype == "bfloat16"
    assert upcast.source_key != kept.source_key


def test_an_unknown_dtype_is_refused_before_anything_loads(checkpoint_dir, cache_dir):
    with pytest.raises(QGraphError, match=r"dtype 'int3' is not an export dtype; use one of float32, float16"):
        QEFFAutoModelForCausalLM.from_pretrained(checkpoint_dir("llama", torch.bfloat16), dtype="int3")


def test_from_pretrained_loads_no_weights(checkpoint_dir, cache_dir):
    model = QEFFAutoModelForCausalLM.from_pretrained(checkpoint_dir("llama", torch.bfloat16), cache_dir=cache_dir)
    assert not model.model_loaded
    model.source_key  # noqa: B018 - the key comes from the files
    assert not model.model_loaded
    assert model.model is not None and model.model_loaded  # the QEfficient attribute loads on demand


def test_the_model_is_released_after_export(tiny_model_dir, tmp_path):
    model = QEFFAutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), cache_dir=tmp_path, verbose=False)
    model.export()
    assert not model.model_loaded


def test_changing_a_weight_file_changes_the_key(tmp_path):
    directory = save_in_dtype("llama", torch.float32, tmp_path / "model")
    before = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=tmp_path / "cache").source_key
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4 - i for i in range(4)) if data[-4:] != bytes([4, 3, 2, 1]) else bytes(4)
    size = weights.stat().st_size
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == size
    after = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=tmp_path / "cache").source_key
    assert after != before


def test_an_edited_model_attribute_is_keyed_by_its_tensors(tiny_model_dir, tmp_path):
    untouched = QEFFAutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"), cache_dir=tmp_path, verbose=False)
    edited = QEFFAutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"), cache_dir=tmp_path, verbose=False)
    with torch.no_grad():
        next(edited.model.parameters()).add_(1.0)
    assert edited.source_key != untouched.source_key


def test_a_path_with_tilde_is_expanded(tiny_model_dir, monkeypatch, tmp_path):
    home = Path(tiny_model_dir("gpt2")).parent
    monkeypatch.setenv("HOME", str(home))
    model = QEFFAutoModelForCausalLM.from_pretrained(
        f"~/{Path(tiny_model_dir('gpt2')).name}", cache_dir=tmp_path, verbose=False
    )
    assert model.architecture == "GPT2LMHeadModel"


def test_a_directory_without_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFoundError, match=r"no weight files in .* \(looked for \*\.safetensors"):
        QEFFAutoModelForCausalLM.from_pretrained(tmp_path)


CACHED_RUN = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any import of torch now fails: the model cannot be materialised
    from transformers import PreTrainedTokenizerFast
    from qgraph import QEFFAutoModelForCausalLM

    model_dir, cache_dir, tokenizer_dir = sys.argv[1:4]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=cache_dir, verbose=False)
    model.compile(prefill_seq_len=8, ctx_len=64)
    result = model.generate(tokenizer, ["My name is"], generation_len=16, verbose=False)
    assert model.artifact.reused and not model.model_loaded
    print(result.generated_ids[0])
    """
)


def test_a_cached_artifact_is_used_without_torch(checkpoint_dir, tokenizer, tmp_path):
    directory = checkpoint_dir("qwen2", torch.bfloat16)
    cache = tmp_path / "cache"
    first = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=cache, verbose=False)
    first.compile(prefill_seq_len=8, ctx_len=64)
    expected = first.generate(tokenizer, [MY_NAME], generation_len=16, verbose=False).generated_ids[0]
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", CACHED_RUN, str(directory), str(cache), str(tokenizer_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(expected)


def test_the_attention_implementation_is_in_the_key(tiny_model_dir, tmp_path):
    """An sdpa model exports a graph no pass fuses: it must never reuse (or be reused as) the eager export."""
    eager = QEFFAutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), cache_dir=tmp_path, verbose=False)
    sdpa = QEFFAutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), cache_dir=tmp_path, verbose=False, attn_implementation="sdpa"
    )
    assert eager.source_key != sdpa.source_key
    in_memory = [
        QEFFAutoModelForCausalLM(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation=impl), verbose=False
        ).source_key
        for impl in ("eager", "sdpa")
    ]
    assert in_memory[0] != in_memory[1]
