"""``qgraph check``: will this checkpoint convert? Answered from its ``config.json`` alone, in about a minute.

The same architecture is built at a tiny size with seeded random weights (every size field shrunk, everything else,
such as rotary variants, norms, windows and soft-caps, kept as the config says), exported, run through the chosen
backend's pipeline and decoded greedily next to HF transformers. The report says which passes fired and whether the
tokens are exact; a failure names the stage and carries the pass's own message, which says what it did not find.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qgraph.checkpoint import expand_path, looks_like_path, read_config_file
from qgraph.errors import ModelNotFoundError, QGraphError

log = logging.getLogger(__name__)

TINY_VOCAB = 512
PREFILL_SEQ_LEN, CTX_LEN, PROMPT_LEN, NEW_TOKENS = 8, 64, 12, 16  # the prompt takes two prefill chunks
TINY_WINDOW = 12  # a sliding window that really cuts inside CTX_LEN

# Size fields, under every name transformers' configs use for them, and the tiny value each gets.
_TINY_SIZES = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers"), 2),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads"), 4),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"), 128),
    "head_dim": 16,
    "rotary_dim": 8,
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 4),
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    **dict.fromkeys(("initializer_range", "init_std"), 0.2),  # peaked logits: greedy choices not decided by noise
}
_KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_WINDOW_FIELDS = ("sliding_window", "window_size")


@dataclass
class CheckReport:
    """What ``qgraph check`` found: the tiny model it built, the passes that fired, and parity with HF."""

    model: str
    architecture: str
    backend: str
    tiny_config: dict[str, Any]
    converts: bool = False
    tokens_exact: bool = False
    first_difference: int | None = None
    tokens_compared: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    failed_stage: str | None = None
    failure: str | None = None

    @property
    def verdict(self) -> str:
        if self.failure:
            return f"does not convert: fails at {self.failed_stage}: {self.failure}"
        if self.tokens_exact:
            return f"converts, tokens exact ({self.tokens_compared} greedy tokens equal HF transformers')"
        return (
            f"converts, but tokens differ from HF transformers' at position {self.first_difference} "
            f"of {self.tokens_compared}"
        )

    def format(self) -> str:
        shown = {**_TINY_SIZES, "vocab_size": 0}
        sizes = ", ".join(f"{k}={v}" for k, v in self.tiny_config.items() if k in shown and v is not None)
        lines = [f"model: {self.model} ({self.architecture}), checked on backend {self.backend!r}", f"tiny: {sizes}"]
        for p in self.passes:
            fired = ", ".join(f"{k} {v}" for k, v in p["counts"].items() if v) or "changed nothing"
            lines.append(f"  pass {p['name']:<24} {'fired' if p['modified'] else 'idle '}  {fired}")
        lines.append(f"result: {self.verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.verdict}


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a local directory or a hub id (that one file only: no weights are fetched)."""
    name = os.fspath(name_or_path)
    if looks_like_path(name):
        path = expand_path(name)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ModelNotFoundError(f"no config.json at {name!r}")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "config.json"))
        except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
            raise ModelNotFoundError(
                f"could not fetch config.json of {name!r} from the hub or its cache: {exc}"
            ) from exc
    return read_config_file(path)


def tiny_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at a tiny size: size fields shrunk, per-layer lists cut to the layers kept, special
    token ids moved inside the tiny vocabulary; every other field as the config says."""
    tiny = dict(config)
    layers_before = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
    for key, value in _TINY_SIZES.items():
        if tiny.get(key) is not None:
            tiny[key] = value
    heads = next((tiny[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads") if k in tiny), 4)
    for key in _KV_HEAD_FIELDS:
        kv = config.get(key)
        if isinstance(kv, int):
            original_heads = next(
                config[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads") if k in config
            )
            tiny[key] = 1 if kv == 1 else heads if kv == original_heads else heads // 2
    for key in _WINDOW_FIELDS:
        if isinstance(tiny.get(key), int) and tiny[key] > TINY_WINDOW:
            tiny[key] = TINY_WINDOW
    for key, value in config.items():  # per-layer lists: keep the first and the last layer's kind
        if isinstance(value, list) and layers_before and len(value) == layers_before and layers_before > 2:
            tiny[key] = [value[0], value[-1]]
    if isinstance(tiny.get("vocab_size"), int):
        tiny["vocab_size"] = TINY_VOCAB
    _move_token_ids(tiny)
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "quantization_config", "auto_map"):
        tiny.pop(key, None)
    return tiny


def _move_token_ids(config: dict[str, Any]) -> None:
    """Special token ids past the tiny vocabulary become small distinct ids (the same id stays the same id)."""
    keys = [k for k in config if k.endswith(("_token_id", "_token_ids"))]
    ids = sorted(
        {i for k in keys for i in (config[k] if isinstance(config[k], list) else [config[k]]) if isinstance(i, int)}
    )
    if all(i < TINY_VOCAB for i in ids):
        return
    moved = {old: new + 1 for new, old in enumerate(ids)}
    for k in keys:
        value = config[k]
        config[k] = [moved.get(i, i) for i in value] if isinstance(value, list) else moved.get(value, value)


def build_tiny_model(config: dict[str, Any], seed: int = 0):
    """A seeded random model of the tiny config, through transformers' own config class for its ``model_type``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise QGraphError(f"model_type {model_type!r} is not known to transformers {_transformers_version()}")
    torch.manual_seed(seed)
    hf_config = CONFIG_MAPPING[model_type].from_dict(config)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _prompt(vocab_size: int, special: set[int], seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    choices = [i for i in range(min(vocab_size, TINY_VOCAB)) if i not in special]
    return [int(t) for t in rng.choice(choices, size=PROMPT_LEN)]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def check_model(
    name_or_path: str | os.PathLike, backend: str = "ort", cache_dir: str | os.PathLike | None = None, seed: int = 0
) -> CheckReport:
    """Build the checkpoint's architecture tiny, convert it for ``backend`` and compare greedy tokens with HF."""
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.compiler import get_backend
    from qgraph.runtime import greedy_generate

    get_backend(backend)  # an unknown backend is refused before any work
    config = read_config(name_or_path)
    tiny = tiny_config(config)
    names = config.get("architectures") or [str(config.get("model_type"))]
    report = CheckReport(str(name_or_path), names[0], backend, tiny)
    stage = "building the tiny model"
    with tempfile.TemporaryDirectory(prefix="qgraph-check-") as scratch:
        try:
            model = build_tiny_model(tiny, seed)
            stage = "export"
            qeff = QEFFAutoModelForCausalLM(
                model, cache_dir=expand_path(cache_dir) if cache_dir else scratch, verbose=False
            )
            qeff.export()
            stage = "compile"
            directory = qeff.compile(backend=backend, prefill_seq_len=PREFILL_SEQ_LEN, ctx_len=CTX_LEN)
            report.passes = [
                {"name": r["name"], "modified": r["modified"], "counts": r["counts"]} for r in qeff.artifact.reports
            ]
            stage = "generate"
            eos = qeff.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
            prompt = _prompt(model.config.get_text_config().vocab_size, eos_ids, seed)
            session = _session_for(qeff, directory, Path(scratch))
            ours = greedy_generate(session, [prompt], 1, NEW_TOKENS, eos_ids)[0][0]
        except QGraphError as exc:
            report.failed_stage, report.failure = _stage_of(stage, str(exc)), " ".join(str(exc).split())
            return report
        except Exception as exc:  # noqa: BLE001 - a check reports any failure instead of raising it
            report.failed_stage, report.failure = stage, f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"
            return report
    reference = _hf_greedy(model, prompt)
    report.converts = True
    report.tokens_compared = len(reference)
    report.tokens_exact = ours == reference
    if not report.tokens_exact:
        report.first_difference = next(
            (i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), min(len(ours), len(reference))
        )
    return report


def _stage_of(stage: str, message: str) -> str:
    """The pass a compile failure came from, when its message names one."""
    if stage == "compile" and "pass '" in message:
        return "pass '" + message.split("pass '", 1)[1].split("'", 1)[0] + "'"
    return stage


def _session_for(qeff, directory: Path, scratch: Path):
    """The backend's own session, or, for an artifact that needs absent hardware, its target-ready graph on ORT."""
    from qgraph.compiler import ONNX_FILE
    from qgraph.errors import BackendUnavailableError

    try:
        return qeff.artifact.load()
    except BackendUnavailableError:
        return graph_session_on_ort(directory / ONNX_FILE, CTX_LEN, PREFILL_SEQ_LEN, scratch)


def graph_session_on_ort(onnx_path: Path, ctx_len: int, prefill_seq_len: int, workdir: Path):
    """A target-ready graph (e.g. a Cloud AI 100 bundle's) in an ONNX Runtime session, ``ctx_len`` bound as a
    target's compiler binds it (batch and sequence length stay symbolic: every run's shapes are a specialization)."""
    import onnx

    from qgraph.backends.ort import OrtDecoderSession

    model = onnx.load(str(onnx_path))
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "ctx_len":
                dim.dim_value = int(ctx_len)
    path = workdir / "graph-on-ort.onnx"
    onnx.save(model, str(path))
    return OrtDecoderSession(path, {}, ["CPUExecutionProvider"], prefill_seq_len=prefill_seq_len)
