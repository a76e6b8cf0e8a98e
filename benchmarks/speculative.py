"""Speculative decoding against plain decode and llama.cpp, SmolLM2-135M-Instruct at batch 1, in one interleaved run.

    python -m benchmarks.speculative                       # everything, ~30 min on 2 shared cores
    python -m benchmarks.speculative --sets grounded --prompts 4 --repeats 1    # a quick look

Two prompt sets (``benchmarks/speculative_prompts.py``), each prompt in the model's chat template, greedy, exactly
``--new-tokens`` tokens (EOS does not stop any variant, so all do the same work):

- ``grounded``: rewrite / edit a given code block, extract from a given passage (the answer copies its input);
- ``open``: open-ended questions (nothing to copy).

Variants (qgraph on ONNX Runtime CPU, float32 weights unless named):

- ``qgraph``: plain decode (compiled without speculation);
- ``qgraph-lookup``: ``generate(prompt_lookup_num_tokens=k)`` on the model compiled with ``num_speculative_tokens=k``;
- ``qgraph-int4-draft``: the same model compiled at ``precision="int4"`` as ``assistant_model`` of the float32 one;
- ``llamacpp`` and ``llamacpp-lookup``: llama-cpp-python on the f32 GGUF converted from the same HF directory, plain
  and with ``draft_model=LlamaPromptLookupDecoding(...)`` (its prompt-lookup decoding), in its own venv
  (``runners/serve_llamacpp_lookup.py``, kept loaded so its runs interleave with qgraph's).

Decode tokens/s = (tokens after the first) / (time of the last token - time of the first token): prefill and the first
token (TTFT) are excluded, for every variant alike. Each repeat runs every prompt once with every variant, the order
of the variants rotating from prompt to prompt (the 2 cores are shared: contention hits all alike); one warm-up
generation per variant first. Per prompt the median over repeats; a set's tokens/s is its decode tokens over the sum
of its per-prompt median decode times. Mean accepted length: accepted guesses per verification pass that checked
any; tokens per pass: decode tokens / target runs after the first token. Greedy tokens of every speculative variant
are checked equal to its plain decode. Writes ``benchmarks/results/speculative.{json,md}``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.speculative_prompts import INPUT_GROUNDED, OPEN_ENDED
from benchmarks.workload import machine_info

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
PREFILL = 64


@dataclass
class Run:
    """One generation: its tokens and how long its decode took."""

    tokens: list[int]
    ttft_s: float
    decode_s: float
    passes: int  # target runs after the first token
    proposed: int = 0
    accepted: int = 0
    verified_rows: int = 0

    @property
    def decode_tokens(self) -> int:
        return len(self.tokens) - 1


@dataclass
class Variant:
    name: str
    run: object  # (prompt index, prompt ids, conversation) -> Run
    baseline: str | None = None  # the variant whose tokens this one must reproduce
    runs: dict[int, list[Run]] = field(default_factory=dict)


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in ISA_FLAGS if f in present]
    return []


# -- qgraph ------------------------------------------------------------------------------------------------------


def qgraph_runner(model, tokenizer, new_tokens: int, **speculation):
    """A generate call with EOS turned off; times from the request's own stamps (first token, last token)."""

    def run(index: int, ids: list[int], conversation: list[dict]) -> Run:
        result = model.generate(
            tokenizer,
            messages=conversation,
            max_new_tokens=new_tokens,
            eos_token_id=[],
            verbose=False,
            **speculation,
        )
        times, stats = result.request_stats[0], result.stats
        accepted = getattr(stats, "accepted_tokens", 0)
        tokens = [int(t) for t in result.generated_ids[0]]
        return Run(
            tokens=tokens,
            ttft_s=times["ttft_s"],
            decode_s=times["e2e_s"] - times["ttft_s"],
            passes=len(tokens) - 1 - accepted,  # batch 1: each run after the first gives 1 + its accepted guesses
            proposed=getattr(stats, "proposed_tokens", 0),
            accepted=accepted,
            verified_rows=getattr(stats, "verified_rows", 0),
        )

    return run


def qgraph_models(model_dir: Path, ctx_len: int, k: int, want: set[str], threads: int) -> tuple[dict, list[str]]:
    """Compiled models by role; notes for the ones that could not be built (e.g. an API not there yet)."""
    from qgraph import QEFFAutoModelForCausalLM

    models, notes = {}, []

    def compiled(role: str, spinning: bool = True, **options):
        model = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), verbose=False)
        try:
            session_options = {"intra_op_num_threads": threads}
            if threads > 1 and not spinning:  # a draft and its target take turns: idle threads must not spin
                session_options["allow_spinning"] = False
            model.compile(prefill_seq_len=PREFILL, ctx_len=ctx_len, session_options=session_options, **options)
        except TypeError as exc:  # an option this qgraph does not know
            notes.append(f"{role}: compile({options}) failed: {exc}")
            return None
        return model

    models["plain"] = compiled("plain")
    speculation = "num_speculative_tokens" in inspect.signature(QEFFAutoModelForCausalLM.compile).parameters
    if want & {"qgraph-lookup", "qgraph-int4-draft"} and not speculation:
        notes.append("qgraph speculative variants skipped: this qgraph's compile has no num_speculative_tokens")
    else:
        # prompt lookup's target runs alone, like plain decode (ORT's default spinning threads: a one-token run ~8%
        # cheaper, benchmarks/results/spec-step-cost.md); a draft's target shares the cores with the draft
        if want & {"qgraph-lookup"}:
            models["speculative"] = compiled("speculative", num_speculative_tokens=k)
        if "qgraph-int4-draft" in want:
            models["draft target"] = compiled("draft target", spinning=False, num_speculative_tokens=k)
            models["int4"] = compiled("int4 draft", spinning=False, precision="int4")
    return models, notes


def verification_cost(plain, speculative, prompt: list[int], widths: list[int]) -> tuple[float, dict[int, float]]:
    """Median ms of one run at batch 1 after ``prompt``: of 1 token on the plain compile, and of ``width`` tokens on
    the speculative one (what checking ``width - 1`` guesses costs), in blocks of consecutive steps interleaved round
    by round (``benchmarks.spec_step_cost``)."""
    from benchmarks.spec_step_cost import interleaved, primed, step_ms

    sessions = {"plain": primed(plain, prompt), "speculative": primed(speculative, prompt)}
    start, token = len(prompt), prompt[-1]
    runs = {"plain 1": lambda: step_ms(sessions["plain"], token, start, 1)}
    runs |= {f"speculative {w}": (lambda w=w: step_ms(sessions["speculative"], token, start, w)) for w in widths}
    medians = {name: stats["median"] for name, stats in interleaved(runs, rounds=10, block=12).items()}
    return medians["plain 1"], {w: medians[f"speculative {w}"] for w in widths}


# -- llama.cpp ---------------------------------------------------------------------------------------------------


class LlamaCppPeer:
    """``runners/serve_llamacpp_lookup.py`` in llama-cpp-python's venv, one JSON line per generation."""

    def __init__(self, python: Path, gguf: Path, ctx_len: int, threads: int, num_pred: int, max_ngram: int):
        script = HERE / "runners" / "serve_llamacpp_lookup.py"
        args = [str(python), str(script), str(gguf), str(ctx_len), str(threads), str(num_pred), str(max_ngram)]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.process.stdout.readline() or "{}")
        if not hello.get("ready"):
            self.close()
            raise RuntimeError("the llama.cpp runner did not start (see its stderr above)")
        self.version = hello.get("llama-cpp-python")

    def runner(self, variant: str, new_tokens: int):
        def run(index: int, ids: list[int], conversation: list[dict]) -> Run:
            job = {"variant": variant, "prompt_ids": ids, "new_tokens": new_tokens}
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
            out = json.loads(self.process.stdout.readline())
            return Run(
                tokens=out["tokens"],
                ttft_s=out["first"] - out["start"],
                decode_s=out["end"] - out["first"],
                passes=out["decode_passes"],
            )

        return run

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def f32_gguf(model_dir: Path, converter_dir: Path, work_dir: Path) -> tuple[Path | None, str]:
    """The f32 GGUF ``benchmarks.run`` also uses (same path: converted once, reused)."""
    from benchmarks.gguf_convert import convert

    path, _, error = convert(model_dir, work_dir / "gguf" / "smollm2-f32.gguf", converter_dir)
    return path, error


# -- the run -----------------------------------------------------------------------------------------------------


def run_set(variants: list[Variant], prompts: list[tuple[list[int], list[dict]]], repeats: int, label: str) -> None:
    for v in variants:  # warm-up: sessions, threads, caches
        v.run(0, *prompts[0])
    for r in range(repeats):
        for p, (ids, conversation) in enumerate(prompts):
            shift = (r + p) % len(variants)
            for v in variants[shift:] + variants[:shift]:
                run = v.run(p, ids, conversation)
                v.runs.setdefault(p, []).append(run)
                print(
                    f"  {label} repeat {r + 1} prompt {p:2d} {v.name:<18} {run.decode_tokens / run.decode_s:6.1f} tok/s"
                    + (f"  accepted {run.accepted}/{run.proposed}" if run.proposed else ""),
                    flush=True,
                )


def summarize(variants: list[Variant]) -> dict:
    by_name = {v.name: v for v in variants}
    out = {}
    for v in variants:
        medians = {p: statistics.median(r.decode_s for r in runs) for p, runs in v.runs.items()}
        decode_tokens = {p: runs[0].decode_tokens for p, runs in v.runs.items()}
        runs = [r for rs in v.runs.values() for r in rs]
        row = {
            "decode_tok_s": sum(decode_tokens.values()) / sum(medians.values()),
            "per_prompt_decode_tok_s": [decode_tokens[p] / medians[p] for p in sorted(medians)],
            "median_ttft_s": statistics.median(r.ttft_s for r in runs),
            "tokens_per_pass": sum(r.decode_tokens for r in runs) / max(1, sum(r.passes for r in runs)),
            "tokens_stable_across_repeats": all(len({tuple(r.tokens) for r in rs}) == 1 for rs in v.runs.values()),
        }
        if any(r.proposed for r in runs):
            row["mean_accepted_length"] = sum(r.accepted for r in runs) / max(1, sum(r.verified_rows for r in runs))
            row["acceptance_rate"] = sum(r.accepted for r in runs) / sum(r.proposed for r in runs)
        if v.baseline in by_name:
            base = by_name[v.baseline]
            same = [v.runs[p][0].tokens == base.runs[p][0].tokens for p in sorted(v.runs)]
            row["tokens_equal_to"] = v.baseline
            row["prompts_with_identical_tokens"] = f"{sum(same)}/{len(same)}"
        out[v.name] = row
    return out


def ratios(summary: dict, base: str) -> dict:
    """Every variant's decode tokens/s over ``base``'s: of the set, and per prompt (min and median)."""
    if base not in summary:
        return {}
    ref = summary[base]
    out = {}
    for name, row in summary.items():
        pairs = zip(row["per_prompt_decode_tok_s"], ref["per_prompt_decode_tok_s"], strict=True)
        per_prompt = [a / b for a, b in pairs]
        out[name] = {
            "set": row["decode_tok_s"] / ref["decode_tok_s"],
            "per_prompt_min": min(per_prompt),
            "per_prompt_median": statistics.median(per_prompt),
        }
    return out


def agreement(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return f"first difference at token {i}"
    return "identical"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# Speculative decoding, SmolLM2-135M-Instruct batch 1 ({data['date']})",
        "",
        f"`{data['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, ISA {' '.join(data['isa_flags'])}; load average "
        f"(1/5/15 min) {' / '.join(f'{x:.1f}' for x in data['load_start'])} at start, "
        f"{' / '.join(f'{x:.1f}' for x in data['load_end'])} at end: the cores are shared with other work "
        "(contended), so compare ratios within this run, not absolute numbers across runs.",
        "",
        f"{data['threads']} threads for every variant; "
        f"{data['new_tokens']} new tokens per prompt (EOS ignored), greedy, chat template; qgraph ORT CPU float32 "
        f"(int4 for the draft), prefill_seq_len {PREFILL}, ctx_len {data['ctx_len']}, num_speculative_tokens "
        f"{data['k']}, prompt_lookup_num_tokens {data['lookup_tokens']}, num_assistant_tokens {data['draft_tokens']}; "
        f"llama.cpp (llama-cpp-python {data.get('llamacpp_version') or '-'}) f32 GGUF, "
        f"LlamaPromptLookupDecoding(max_ngram_size={data['llama_ngram']}, num_pred_tokens={data['llama_pred']}). "
        f"Median of {data['repeats']} interleaved repeats per prompt after one warm-up per variant. Decode tokens/s "
        "excludes prefill and the first token (time from first to last token).",
        "",
    ]
    for note in data["notes"]:
        lines.append(f"- note: {note}")
    if data["notes"]:
        lines.append("")
    cost = data["verification_ms"]
    if cost["speculative_compile"]:
        widths = cost["speculative_compile"]
        lines += [
            "Cost of one run of the speculative compile at batch 1 by tokens per row (median ms, blocks of 12 steps "
            "interleaved over 10 rounds; plain "
            f"compile, 1 token: {cost['plain_compile_width_1']:.2f} ms):",
            "",
            "| tokens per run | " + " | ".join(str(w) for w in widths) + " |",
            "|---" * (len(widths) + 1) + "|",
            "| ms | " + " | ".join(f"{widths[w]:.2f}" for w in widths) + " |",
            "",
        ]
    for set_name, result in data["sets"].items():
        base = "qgraph"
        lines += [
            f"## {set_name} ({result['prompts']} prompts)",
            "",
            "| variant | decode tok/s | vs qgraph plain (set / min prompt / median prompt) | vs llama.cpp lookup | "
            "mean accepted length | acceptance | tokens per pass | TTFT s | tokens |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        vs_plain = result["ratios"].get(base, {})
        vs_llama = result["ratios"].get("llamacpp-lookup", {})
        for name, row in result["summary"].items():
            r = vs_plain.get(name)
            rl = f"{vs_llama[name]['set']:.2f}x" if name in vs_llama else "-"
            tokens = (
                f"{row['prompts_with_identical_tokens']} identical to {row['tokens_equal_to']}"
                if "tokens_equal_to" in row
                else "-"
            )
            lines.append(
                f"| {name} | {row['decode_tok_s']:.1f} | "
                + (f"{r['set']:.2f}x / {r['per_prompt_min']:.2f}x / {r['per_prompt_median']:.2f}x" if r else "-")
                + f" | {rl} | "
                + f"{row.get('mean_accepted_length', 0):.2f} | {row.get('acceptance_rate', 0):.2f} | "
                + f"{row['tokens_per_pass']:.2f} | {row['median_ttft_s']:.3f} | {tokens} |"
            )
        if "qgraph_vs_llamacpp_plain_tokens" in result:
            lines += ["", f"qgraph plain vs llama.cpp plain tokens: {result['qgraph_vs_llamacpp_plain_tokens']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="grounded,open")
    parser.add_argument(
        "--variants", default="qgraph,qgraph-lookup,qgraph-int4-draft,llamacpp,llamacpp-lookup", help="subset to run"
    )
    parser.add_argument(
        "--open-variants", default="qgraph,qgraph-lookup,qgraph-int4-draft,llamacpp,llamacpp-lookup", help="on open"
    )
    parser.add_argument("--prompts", type=int, default=None, help="only the first N prompts of each set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens compiled")
    parser.add_argument("--lookup-tokens", type=int, default=None, help="prompt_lookup_num_tokens (default k)")
    parser.add_argument("--draft-tokens", type=int, default=4, help="num_assistant_tokens of the int4 draft")
    parser.add_argument("--llama-pred", type=int, default=10, help="LlamaPromptLookupDecoding num_pred_tokens")
    parser.add_argument("--llama-ngram", type=int, default=2, help="LlamaPromptLookupDecoding max_ngram_size")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of every variant (ORT intra_op, llama.cpp n_threads)"
    )
    parser.add_argument("--peers-dir", type=Path, default=Path("/work/peers"))
    parser.add_argument("--converter-dir", type=Path, default=None, help="dir of convert_hf_to_gguf.py")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "qgraph" / "bench" / "work")
    parser.add_argument("--name", default="speculative", help="output file stem in benchmarks/results")
    args = parser.parse_args(argv)
    lookup_tokens = args.lookup_tokens or args.k
    want = set(args.variants.split(",")) | set(args.open_variants.split(","))
    command = "python -m benchmarks.speculative " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from benchmarks.models import smollm2_dir
    from qgraph.prompts import prompt_token_ids

    load_start = os.getloadavg()
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sets = {"grounded": INPUT_GROUNDED, "open": OPEN_ENDED}
    chosen = {s: sets[s][: args.prompts] for s in args.sets.split(",")}
    conversations = {s: [[{"role": "user", "content": text}] for text in texts] for s, texts in chosen.items()}
    ids = {s: prompt_token_ids(tokenizer, messages=c)[1] for s, c in conversations.items()}
    longest = max(len(i) for rows in ids.values() for i in rows)
    ctx_len = 64 * -(-(longest + args.new_tokens + args.k + 1) // 64)

    notes: list[str] = []
    models, model_notes = qgraph_models(model_dir, ctx_len, args.k, want, args.threads)
    notes += model_notes
    variants: dict[str, Variant] = {}
    if models.get("plain") is not None:
        variants["qgraph"] = Variant("qgraph", qgraph_runner(models["plain"], tokenizer, args.new_tokens))
    if "qgraph-lookup" in want and models.get("speculative") is not None:
        variants["qgraph-lookup"] = Variant(
            "qgraph-lookup",
            qgraph_runner(models["speculative"], tokenizer, args.new_tokens, prompt_lookup_num_tokens=lookup_tokens),
            baseline="qgraph",
        )
    if "qgraph-int4-draft" in want and models.get("draft target") is not None and models.get("int4") is not None:
        variants["qgraph-int4-draft"] = Variant(
            "qgraph-int4-draft",
            qgraph_runner(
                models["draft target"],
                tokenizer,
                args.new_tokens,
                assistant_model=models["int4"],
                num_assistant_tokens=args.draft_tokens,
            ),
            baseline="qgraph",
        )
    peer = None
    if want & {"llamacpp", "llamacpp-lookup"}:
        python = args.peers_dir / "llamacpp" / "bin" / "python"
        converter = args.converter_dir or args.peers_dir / "llama.cpp-convert"
        gguf, error = f32_gguf(model_dir, converter, args.work_dir)
        if gguf is None:
            notes.append(f"llama.cpp skipped: no f32 GGUF ({error.splitlines()[-1] if error else 'not converted'})")
        elif not python.exists():
            notes.append(f"llama.cpp skipped: {python} not found (bash benchmarks/setup_peers.sh llamacpp)")
        else:
            peer = LlamaCppPeer(python, gguf, ctx_len, args.threads, args.llama_pred, args.llama_ngram)
            if "llamacpp" in want:
                variants["llamacpp"] = Variant("llamacpp", peer.runner("plain", args.new_tokens))
            if "llamacpp-lookup" in want:
                variants["llamacpp-lookup"] = Variant(
                    "llamacpp-lookup", peer.runner("lookup", args.new_tokens), baseline="llamacpp"
                )

    results = {}
    cost, plain_cost = {}, None
    try:
        for set_name in chosen:
            names = set((args.open_variants if set_name == "open" else args.variants).split(","))
            chosen_variants = [Variant(v.name, v.run, v.baseline) for v in variants.values() if v.name in names]
            prompts = list(zip(ids[set_name], conversations[set_name], strict=True))
            run_set(chosen_variants, prompts, args.repeats, set_name)
            summary = summarize(chosen_variants)
            result = {
                "prompts": len(prompts),
                "prompt_tokens": [len(i) for i in ids[set_name]],
                "summary": summary,
                "ratios": {base: ratios(summary, base) for base in ("qgraph", "llamacpp-lookup") if base in summary},
                "tokens": {v.name: [v.runs[p][0].tokens for p in sorted(v.runs)] for v in chosen_variants},
            }
            if "qgraph" in result["tokens"] and "llamacpp" in result["tokens"]:
                pairs = zip(result["tokens"]["qgraph"], result["tokens"]["llamacpp"], strict=True)
                found = [agreement(a, b) for a, b in pairs]
                result["qgraph_vs_llamacpp_plain_tokens"] = (
                    f"{found.count('identical')}/{len(found)} prompts identical"
                    + (
                        "; " + "; ".join(f for f in found if f != "identical")
                        if found.count("identical") < len(found)
                        else ""
                    )
                )
            results[set_name] = result
        if models.get("speculative") is not None and "qgraph-lookup" in variants:
            first = next(iter(ids.values()))[0]
            widths = sorted({1, 2, 3, 5, args.k + 1} & set(range(1, args.k + 2)))
            plain_cost, cost = verification_cost(models["plain"], models["speculative"], first, widths)
    finally:
        if peer is not None:
            peer.close()

    data = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": machine_info(),
        "isa_flags": cpu_flags(),
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ctx_len": ctx_len,
        "k": args.k,
        "lookup_tokens": lookup_tokens,
        "draft_tokens": args.draft_tokens,
        "llama_pred": args.llama_pred,
        "llama_ngram": args.llama_ngram,
        "llamacpp_version": peer.version if peer else None,
        "threads": args.threads,
        "notes": notes,
        "verification_ms": {"plain_compile_width_1": plain_cost, "speculative_compile": cost},
        "sets": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    text = markdown(data)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
