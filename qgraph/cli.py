"""``qgraph`` command line: infer, eval, export, optimize, check, serve, passes, backends.

Errors that come from the user's input are printed as one line (``error: ...``) with exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from qgraph.cache import cache_root, user_path
from qgraph.errors import QGraphError

API_KEY_ENV = "QGRAPH_API_KEY"  # read by `qgraph serve` only, and said so when used


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="export, compile and generate; prints text and latency stats")
    p.add_argument("--model", "--model-name", dest="model", required=True, help="hub id or local directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--tokenizer", help="tokenizer id or directory (default: the model's)")
    p.add_argument("--gguf-file", help="load weights (and tokenizer) from this GGUF file inside --model")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill chunk length (prefill_seq_len)")
    p.add_argument("--ctx-len", type=int, default=128, help="KV buffer length: prompt + generated tokens")
    p.add_argument(
        "--generation-len",
        "--max-new-tokens",
        dest="generation_len",
        type=int,
        default=None,
        help="new tokens (default: until EOS or ctx_len)",
    )
    _add_decoding(p)
    _add_speculation(p)
    p.add_argument("--batch-size", type=int, default=1, help="prompts run together")
    p.add_argument("--backend", default="ort", help="see `qgraph backends`")
    p.add_argument("--num-cores", type=int, default=None, help="cores to compile for (targets that use it)")
    p.add_argument(
        "--precision",
        default="float32",
        help="float32, float16, or weight-only int8 / int4 (MatMulNBits); `qgraph backends` lists each one's dtypes",
    )
    p.add_argument("--passes", help="override the backend's pipeline: a,b,c or a JSON/YAML file")
    p.add_argument("--dtype", default=None, help="export dtype: float32 (default), float16, bfloat16 or auto (stored)")
    p.add_argument("--stream", action="store_true", help="print the first prompt's text as it is generated")
    p.add_argument("--cache-dir", type=user_path, default=None)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. mxfp6_matmul=true (values parsed as JSON when they can be)",
    )


def _add_decoding(p) -> None:
    """transformers' decoding options; unset ones come from the model's generation_config."""
    g = p.add_argument_group("decoding (greedy unless --do-sample)")
    g.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="seed of each prompt's own random generator")
    g.add_argument("--stop", action="append", help="stop string (repeatable); the text ends before it")
    g.add_argument("--prompt-lookup-num-tokens", type=int, help="speculative decoding: guess K tokens by prompt lookup")


def _add_speculation(p, serving: bool = False) -> None:
    """Speculative decoding: the verification graph (compile) and a draft model."""
    g = p.add_argument_group("speculative decoding (same greedy tokens, fewer passes over the weights)")
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        help="compile runs that verify K guessed tokens per row (default: --prompt-lookup-num-tokens, or 4 with "
        "--assistant-model)",
    )
    g.add_argument(
        "--assistant-model",
        help="a draft model with the same tokenizer (hub id or directory)"
        + ("; every request drafts with it unless it asks for prompt_lookup_num_tokens" if serving else ""),
    )
    g.add_argument(
        "--assistant-precision", default="float32", help="the draft's precision, e.g. int4 for the same model"
    )


DEFAULT_SPECULATIVE_TOKENS = 4


def _speculative_tokens(args, lookup: int | None) -> int | None:
    """The compile's num_speculative_tokens: as given, else what the prompt lookup or the draft needs."""
    if args.num_speculative_tokens is not None:
        return args.num_speculative_tokens
    if lookup is not None:
        return lookup
    return DEFAULT_SPECULATIVE_TOKENS if args.assistant_model else None


def _assistant(args, prefill_seq_len: int, ctx_len: int):
    """The draft model of ``--assistant-model``, compiled (or None)."""
    if not args.assistant_model:
        return None
    from qgraph.api import QEFFAutoModelForCausalLM

    draft = QEFFAutoModelForCausalLM.from_pretrained(args.assistant_model, cache_dir=args.cache_dir, dtype=args.dtype)
    draft.compile(prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, precision=args.assistant_precision)
    return draft


DECODING_FLAGS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "prompt_lookup_num_tokens",
)


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise QGraphError(f"--option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _load_tokenizer(name: str, chat: bool, hf_kwargs: dict):
    """The tokenizer, loaded before the model is exported: a missing one or one without a chat template (``--chat``)
    is found in a second, not after the export."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(user_path(name)), **hf_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise QGraphError(
            f"could not load a tokenizer from {name!r} ({' '.join(str(exc).split())[:300]}): pass --tokenizer DIR_OR_ID"
        ) from exc
    if chat and not getattr(tokenizer, "chat_template", None):
        raise QGraphError(f"the tokenizer of {name!r} has no chat template: drop --chat or pass a --tokenizer with one")
    return tokenizer


def cmd_infer(args) -> int:
    from qgraph.api import QEFFAutoModelForCausalLM

    hf_kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    cache_root(args.cache_dir)  # a --cache-dir that is a file is refused before anything loads
    model = QEFFAutoModelForCausalLM.from_pretrained(
        args.model, cache_dir=args.cache_dir, dtype=args.dtype, **hf_kwargs
    )
    tokenizer = _load_tokenizer(args.tokenizer or args.model, args.chat, hf_kwargs)  # before a long export
    model.compile(
        backend=args.backend,
        prefill_seq_len=args.prompt_len,
        ctx_len=args.ctx_len,
        batch_size=args.batch_size,
        num_cores=args.num_cores,
        precision=args.precision,
        passes=args.passes,
        num_speculative_tokens=_speculative_tokens(args, args.prompt_lookup_num_tokens),
        **_parse_options(args.option),
    )
    decoding = {k: getattr(args, k) for k in DECODING_FLAGS if getattr(args, k) is not None}
    assistant = _assistant(args, args.prompt_len, args.ctx_len)
    if assistant is not None:
        decoding["assistant_model"] = assistant
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        model.generate(
            tokenizer, messages=conversations, generation_len=args.generation_len, stream=args.stream, **decoding
        )
    else:
        model.generate(tokenizer, args.prompt, generation_len=args.generation_len, stream=args.stream, **decoding)
    return 0


def cmd_serve(args) -> int:
    """Start at once (``/health`` answers 503 until ready), compile or reuse the model in the background, serve."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise QGraphError(f"qgraph serve needs {', '.join(missing)}: pip install 'qgraph[serve]'")
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.server import Served, serve
    from qgraph.tokenizer import load_tokenizer

    cache_root(args.cache_dir)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key and not args.api_key:
        logging.getLogger(__name__).warning("requests need the API key set in %s", API_KEY_ENV)

    def load() -> Served:
        model = QEFFAutoModelForCausalLM.from_pretrained(args.model, cache_dir=args.cache_dir, dtype=args.dtype)
        model.compile(
            backend=args.backend,
            prefill_seq_len=args.prompt_len,
            ctx_len=args.ctx_len,
            precision=args.precision,
            full_batch_size=args.full_batch_size,
            num_speculative_tokens=_speculative_tokens(args, None),
            **_parse_options(args.option),
        )
        name = args.tokenizer or args.model
        try:
            tokenizer = load_tokenizer(name)  # no transformers (or torch) in the serving process where it can
        except QGraphError:
            tokenizer = _load_tokenizer(name, False, {})
        return Served(model, tokenizer, _assistant(args, args.prompt_len, args.ctx_len))

    name = args.served_model_name or args.model
    if args.ray:
        if importlib.util.find_spec("ray") is None:
            raise QGraphError("qgraph serve --ray needs Ray Serve: pip install 'qgraph[ray]'")
        from qgraph.ray_serve import serve_on_ray

        load()  # compile once here: every replica then loads the cached artifact
        serve_on_ray(load, name, args.host, args.port, args.replicas, args.max_queue, api_key, args.ray_address)
    else:
        serve(load, name, args.host, args.port, args.max_queue, api_key)
    return 0


def cmd_eval(args) -> int:
    """Perplexity of the compiled model on an English text, top-1 agreement with float32 qgraph and HF."""
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.eval_text import file_text
    from qgraph.evaluation import REFERENCES, evaluate
    from qgraph.perplexity import check_windows

    check_windows(args.ctx_len, args.stride)  # before any model is read
    references = [r.strip() for r in args.references.split(",") if r.strip() and r.strip() != "none"]
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise QGraphError(f"--references: unknown {unknown[0]!r}; give a comma list of {', '.join(REFERENCES)} or none")
    text = file_text(args.text) if args.text else None
    cache_root(args.cache_dir)
    model = QEFFAutoModelForCausalLM.from_pretrained(args.model, cache_dir=args.cache_dir, dtype=args.dtype)
    tokenizer = _load_tokenizer(args.tokenizer, False, {}) if args.tokenizer else None
    options = _parse_options(args.option)
    if args.passes:
        options["passes"] = args.passes
    result = evaluate(
        model,
        text,
        tokenizer,
        ctx_len=args.ctx_len,
        stride=args.stride,
        precision=args.precision,
        backend=args.backend,
        compile_options=options,
        references=references,
    )
    print(result.format_table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _add_eval(sub) -> None:
    from qgraph.perplexity import DEFAULT_CTX_LEN, DEFAULT_STRIDE

    p = sub.add_parser(
        "eval",
        help="perplexity of the compiled model on an English text (sliding windows), with top-1 agreement vs "
        "float32 qgraph and HF transformers",
    )
    p.add_argument("--model", "--model-name", dest="model", required=True, help="hub id or local directory")
    p.add_argument("--precision", default="float32", help="float32, float16, int8 or int4")
    p.add_argument(
        "--text",
        type=user_path,
        help="UTF-8 English text file (default: Debian's licence texts GPL-3, GPL-2, Apache-2.0, GFDL-1.3, MPL-2.0 "
        "from /usr/share/common-licenses, ~23k tokens)",
    )
    p.add_argument("--ctx-len", type=int, default=DEFAULT_CTX_LEN, help="window length in tokens")
    p.add_argument(
        "--stride", type=int, default=DEFAULT_STRIDE, help="tokens between window starts; a window scores its new ones"
    )
    p.add_argument(
        "--references", default="float32,hf", help="compare top-1 predictions with: float32,hf (default), or none"
    )
    p.add_argument("--json", type=user_path, help="write the result as JSON")
    p.add_argument("--tokenizer", help="tokenizer id or directory (default: the model's)")
    p.add_argument("--backend", default="ort", help="see `qgraph backends`")
    p.add_argument("--passes", help="override the backend's pipeline: a,b,c or a JSON/YAML file")
    p.add_argument("--dtype", default=None, help="export dtype: float32 (default), float16, bfloat16 or auto")
    p.add_argument("--cache-dir", type=user_path, default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend option")


def cmd_export(args) -> int:
    from qgraph.api import QEFFAutoModelForCausalLM

    cache_root(args.cache_dir)  # a --cache-dir that is a file is refused before the model loads
    model = QEFFAutoModelForCausalLM.from_pretrained(args.model, cache_dir=args.cache_dir, dtype=args.dtype)
    path = model.export()
    if args.output:
        import onnx_ir as ir

        args.output.parent.mkdir(parents=True, exist_ok=True)
        ir.save(ir.load(path), args.output, external_data=args.output.name + ".data")
        path = args.output
    print(path)
    return 0


def _load_checked_onnx(path: Path):
    """``path`` as an ``ir.Model`` once it passed ``onnx.checker`` and has a graph with inputs and outputs (a 2-byte
    file parses as an empty model, from which a pass would write an invalid one)."""
    import onnx
    import onnx_ir as ir

    if not path.is_file():
        raise QGraphError(f"ONNX file {path} does not exist")
    try:
        onnx.checker.check_model(str(path))
        model = ir.load(path)
    except Exception as exc:  # protobuf, checker, external-data and I/O errors all mean the same to the user
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise QGraphError(f"{path} is not a valid ONNX model ({reason}): give a complete .onnx file") from exc
    if not model.graph.inputs or not model.graph.outputs:
        raise QGraphError(f"{path} has a graph without inputs or outputs: give a complete .onnx model")
    return model


def cmd_optimize(args) -> int:
    import onnx_ir as ir

    from qgraph.pass_manager import format_reports, parse_pipeline, run_pipeline

    specs = parse_pipeline(args.passes)
    if not specs:
        raise QGraphError("no passes given: --passes a,b,c or a pipeline file")
    model = _load_checked_onnx(args.input)
    verify = None
    if args.verify:
        from qgraph.verify import max_abs_diff_on_ort

        verify = max_abs_diff_on_ort
    reports = run_pipeline(model, specs, verify=verify)
    print(format_reports(reports, explain=args.explain))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, args.output, external_data=args.output.name + ".data")
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in reports], indent=2))
    print(f"wrote {args.output}")
    return 0


def cmd_check(args) -> int:
    from qgraph.check import check_model

    report = check_model(args.model, backend=args.backend, cache_dir=args.cache_dir)
    print(report.format())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.converts and report.tokens_exact else 1


def cmd_passes(args) -> int:
    from qgraph.registry import pass_registry

    for entry in pass_registry():
        try:
            summary = getattr(entry.load(), "summary", "") or ""
        except QGraphError as exc:
            summary = f"BROKEN: {exc}"
        print(f"{entry.name:<24} {summary}  [{entry.distribution}]")
    return 0


def cmd_backends(args) -> int:
    from qgraph.registry import backend_registry

    for entry in backend_registry():
        try:
            caps = entry.load().capabilities.as_dict()
            detail = ", ".join(f"{k}={v}" for k, v in caps.items())
        except QGraphError as exc:
            detail = f"BROKEN: {exc}"
        print(f"{entry.name:<10} [{entry.distribution}] {detail}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_infer(sub)
    _add_eval(sub)
    p = sub.add_parser("export", help="export a model to vanilla ONNX (cached); prints the path")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", type=user_path)
    p.add_argument("--cache-dir", type=user_path, default=None)
    p.add_argument("--dtype", default=None, help="export dtype: float32 (default), float16, bfloat16 or auto (stored)")
    p = sub.add_parser("optimize", help="run passes on any ONNX file")
    p.add_argument("input", type=user_path)
    p.add_argument("-o", "--output", type=user_path, required=True)
    p.add_argument("--passes", required=True, help="a,b,c or a JSON/YAML pipeline file")
    p.add_argument("--json", type=user_path, help="write the pass reports as JSON")
    p.add_argument("--verify", action="store_true", help="measure each pass's max output difference on ORT")
    p.add_argument("--explain", action="store_true", help="list each candidate a pass left unfused, with the reason")
    p = sub.add_parser(
        "check",
        help="from config.json alone: build the architecture tiny, convert it, compare greedy tokens with HF "
        "(exit 0: converts with exact tokens; 1: it does not, and says where)",
    )
    p.add_argument("model", help="hub id or directory with a config.json (no weights are read)")
    p.add_argument("--backend", default="ort", help="see `qgraph backends`")
    p.add_argument("--json", type=user_path, help="write the report as JSON")
    p.add_argument("--cache-dir", type=user_path, default=None, help="keep the tiny model's artifacts here")
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) on the engine")
    p.add_argument("--model", "--model-name", dest="model", required=True, help="hub id or local directory")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    p.add_argument("--tokenizer", help="tokenizer id or directory (default: the model's)")
    p.add_argument("--backend", default="ort", help="see `qgraph backends`")
    p.add_argument("--full-batch-size", type=int, default=8, help="KV slots: requests decoded together")
    p.add_argument("--precision", default="float32", help="float32, float16, int8 or int4")
    p.add_argument("--dtype", default=None, help="export dtype: float32 (default), float16, bfloat16 or auto")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill chunk length (prefill_seq_len)")
    p.add_argument("--ctx-len", type=int, default=1024, help="KV buffer length per request: prompt + completion")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; one more gets 429")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--cache-dir", type=user_path, default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend option")
    _add_speculation(p, serving=True)
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (a local cluster, or --ray-address)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas, each with its own engine")
    p.add_argument("--ray-address", default=None, help="with --ray: join this cluster ('auto', ray://HOST:10001)")
    sub.add_parser("passes", help="list registered passes")
    sub.add_parser("backends", help="list registered backends and their capabilities")
    return parser


COMMANDS = {
    "infer": cmd_infer,
    "eval": cmd_eval,
    "export": cmd_export,
    "optimize": cmd_optimize,
    "check": cmd_check,
    "serve": cmd_serve,
    "passes": cmd_passes,
    "backends": cmd_backends,
}


class _StderrNotes(logging.Handler):
    """The library's warnings (``logging``) as ``qgraph: note: ...`` lines on the terminal while a command runs."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"qgraph: note: {record.getMessage()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notes = _StderrNotes(logging.WARNING)
    logging.getLogger("qgraph").addHandler(notes)
    try:
        return COMMANDS[args.command](args)
    except QGraphError as exc:
        return _error(str(exc))
    except BrokenPipeError:
        # the reader went away (``qgraph passes | head``): nothing more can be printed; no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _error("output closed early (broken pipe); the command stopped printing")
    except OSError as exc:  # a path the user gave cannot be read or written
        where = f" {exc.filename}" if exc.filename else ""
        return _error(f"could not read or write{where}: {exc.strerror or exc}; check the path and its permissions")
    finally:
        logging.getLogger("qgraph").removeHandler(notes)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
