"""The Cloud AI 100 bundle, checked without the card: files, command line, cache key, and the graph it would compile.

The graph check is the strong one: the bundle's ``model.onnx``, with its symbols bound to the specialization values
as the compiler binds them, runs on ONNX Runtime CPU and gives HF transformers' greedy tokens.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import yaml

from qgraph.backend_api import CompileOptions
from qgraph.backends.ai100 import STANDARD_COMPILERS, AI100Backend, find_compiler
from qgraph.backends.ai100_bundle import BundleSettings, compile_command, option_flag
from qgraph.backends.ai100_rmsnorm import CUSTOM_RMSNORM
from qgraph.backends.ort import OrtDecoderSession
from qgraph.cli import main
from qgraph.errors import BackendUnavailableError, QGraphError
from qgraph.pipelines import standard_pipeline
from qgraph.registry import pass_registry
from qgraph.runtime import greedy_generate
from tests.backends.fake_qaic import write_fake_compiler
from tests.bundle_on_ort import bundle_session
from tests.parity import LONG_PROMPT, MY_NAME, NEW_TOKENS, hf_greedy

ARCHS = ["gpt2", "llama"]
N_LAYERS = 2
PREFILL, CTX, BATCH = 8, 64, 2
FP16_MAX = 65504.0
FIXED_FLAGS = [
    "-m=model.onnx",
    "-aic-hw",
    "-aic-hw-version=2.0",
    "-compile-only",
    "-retained-state",
    "-convert-to-fp16",
    "-aic-num-cores=16",
    "-network-specialization-config=specializations.json",
    "-custom-IO-list-file=custom_io.yaml",
    "-aic-binary-dir=qpc",
]
no_sdk = pytest.mark.skipif(find_compiler() is not None, reason="this machine has the Cloud AI 100 SDK compiler")


@pytest.fixture(scope="module")
def bundle(qeff_model):
    """``bundle(arch, **options)`` -> the ai100 bundle directory (compiled once per distinct request)."""

    def make(arch: str, prefill_seq_len: int = PREFILL, batch_size: int = BATCH, **options) -> Path:
        return qeff_model(arch).compile(
            backend="ai100", prefill_seq_len=prefill_seq_len, ctx_len=CTX, batch_size=batch_size, **options
        )

    return make


def manifest(directory: Path) -> dict:
    return json.loads((directory / "bundle.json").read_text())


def kv_io(directory: Path) -> tuple[list[str], list[str]]:
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return (
        [v.name for v in graph.input if v.name.startswith("past_")],
        [v.name for v in graph.output if v.name.endswith("_RetainedState")],
    )


# -- the files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_specializations_hold_a_prefill_and_a_decode_entry(bundle, arch):
    data = json.loads((bundle(arch) / "specializations.json").read_text())
    assert data == {
        "specializations": [
            {"batch_size": str(BATCH), "seq_len": str(PREFILL), "ctx_len": str(CTX)},
            {"batch_size": str(BATCH), "seq_len": "1", "ctx_len": str(CTX)},
        ]
    }


def test_num_speculative_tokens_adds_a_verification_specialization(bundle):
    data = json.loads((bundle("llama", num_speculative_tokens=3) / "specializations.json").read_text())
    assert [s["seq_len"] for s in data["specializations"]] == [str(PREFILL), "1", "4"]
    data = json.loads(
        (bundle("llama", num_speculative_tokens=3, full_batch_size=4) / "specializations.json").read_text()
    )
    assert [(s["batch_size"], s["seq_len"]) for s in data["specializations"]] == [
        ("1", str(PREFILL)),
        ("4", "1"),
        ("4", "4"),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_custom_io_lists_every_kv_tensor_once_in_float16(bundle, arch):
    directory = bundle(arch)
    entries = yaml.safe_load((directory / "custom_io.yaml").read_text())
    inputs, outputs = kv_io(directory)
    assert len(inputs) == len(outputs) == 2 * N_LAYERS
    assert [e["IOName"] for e in entries] == inputs + outputs
    assert {e["Precision"] for e in entries} == {"float16"}
    assert set(outputs) == {f"{name}_RetainedState" for name in inputs}


@pytest.mark.parametrize("arch", ARCHS)
def test_mxint8_kv_cache_changes_the_custom_io_precision_and_nothing_else(bundle, arch):
    plain, mxint8 = bundle(arch), bundle(arch, mxint8_kv_cache=True)
    assert plain != mxint8
    entries = yaml.safe_load((mxint8 / "custom_io.yaml").read_text())
    assert len(entries) == 4 * N_LAYERS and {e["Precision"] for e in entries} == {"mxint8"}
    assert manifest(mxint8)["command"] == manifest(plain)["command"]
    assert (mxint8 / "specializations.json").read_text() == (plain / "specializations.json").read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_default_command_has_the_fixed_flags_only(bundle, arch):
    directory = bundle(arch)
    command = manifest(directory)["command"]
    assert command == [str(STANDARD_COMPILERS[0]), *FIXED_FLAGS]
    assert not (directory / "mdp_partition.json").exists()


def test_every_option_is_reflected_in_the_command_line(bundle):
    directory = bundle(
        "llama",
        num_cores=4,
        mxfp6_matmul=True,
        mos=2,
        aic_enable_depth_first=True,
        num_devices=2,
        compiler_options={"aic_hw_version": "2.1", "aic_perf_warnings": True, "stats_level": 0, "aic_pmu": False},
    )
    command = manifest(directory)["command"]
    assert command[1:] == [
        "-m=model.onnx",
        "-aic-hw",
        "-aic-hw-version=2.1",
        "-compile-only",
        "-retained-state",
        "-convert-to-fp16",
        "-aic-num-cores=4",
        "-network-specialization-config=specializations.json",
        "-custom-IO-list-file=custom_io.yaml",
        "-aic-binary-dir=qpc",
        "-mxfp6-matmul",
        "-mos=2",
        "-aic-enable-depth-first",
        "-mdp-load-partition-config=mdp_partition.json",
        "-aic-perf-warnings",
        "-stats-level=0",
    ]
    assert json.loads((directory / "mdp_partition.json").read_text()) == {
        "connections": [{"devices": [0, 1], "type": "p2p"}],
        "partitions": [
            {"name": "Partition0", "devices": [{"deviceId": 0, "numCores": 4}, {"deviceId": 1, "numCores": 4}]}
        ],
    }


@pytest.mark.parametrize(
    "options, added",
    [
        ({"mxfp6_matmul": True}, ["-mxfp6-matmul"]),
        ({"mos": 1}, ["-mos=1"]),
        ({"mos": -1}, []),  # QEfficient's "unset"
        ({"aic_enable_depth_first": True}, ["-aic-enable-depth-first"]),
        ({"num_devices": 4}, ["-mdp-load-partition-config=mdp_partition.json"]),
        ({"mxint8_kv_cache": True}, []),
        ({"mxfp6_matmul": False, "aic_enable_depth_first": False, "num_devices": 1}, []),
    ],
)
def test_each_option_adds_exactly_its_flag(options, added):
    settings = BundleSettings.from_options(CompileOptions(extra=options))
    assert compile_command("qaic-exec", settings) == ["qaic-exec", *FIXED_FLAGS, *added]


def test_the_flag_rule():
    assert option_flag("aic_enable_depth_first", True) == "-aic-enable-depth-first"
    assert option_flag("mos", 2) == "-mos=2"
    assert option_flag("custom_IO_list_file", "c.yaml") == "-custom-IO-list-file=c.yaml"
    assert option_flag("mxfp6_matmul", False) is None and option_flag("mos", None) is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mxfp6_matmul": "yes"}, "mxfp6_matmul must be true or false"),
        ({"mos": 0}, "mos must be a positive integer"),
        ({"num_devices": 0}, "num_devices must be a positive integer"),
        ({"compiler_options": {"aic_binary_dir": "elsewhere"}}, "compiler_options may not set aic_binary_dir"),
        ({"compiler_options": {"mos": 2}}, "compiler_options may not set mos"),
    ],
)
def test_bad_options_are_refused_with_the_reason(options, message):
    with pytest.raises(QGraphError, match=message):
        BundleSettings.from_options(CompileOptions(extra=options))


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_sh_runs_the_recorded_command_from_the_bundle(bundle, arch):
    directory = bundle(arch)
    script = (directory / "compile.sh").read_text()
    assert script.startswith("#!/bin/sh\n") and 'cd "$(dirname "$0")"' in script
    command_text = script[script.index(str(STANDARD_COMPILERS[0])) :]
    assert shlex.split(command_text.replace("\\\n", " ")) == manifest(directory)["command"]
    assert (directory / "compile.sh").stat().st_mode & 0o111


# -- the cache key ----------------------------------------------------------------------------------------------


def test_an_unchanged_request_reuses_the_bundle_and_a_changed_one_does_not(bundle, qeff_model):
    first = bundle("gpt2", mos=3)
    stamp = (first / "bundle.json").stat().st_mtime_ns
    assert bundle("gpt2", mos=3) == first and qeff_model("gpt2").artifact.reused
    assert (first / "bundle.json").stat().st_mtime_ns == stamp
    others = {
        bundle("gpt2", mos=4),
        bundle("gpt2", mos=3, num_cores=8),
        bundle("gpt2", mos=3, batch_size=1),
        bundle("gpt2", mos=3, prefill_seq_len=16),
        bundle("gpt2", mos=3, mxfp6_matmul=True),
    }
    assert first not in others and len(others) == 5


# -- the graph the card would compile ---------------------------------------------------------------------------


def test_the_pipeline_is_chosen_from_the_capabilities(bundle):
    backend = AI100Backend()
    options = CompileOptions(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=BATCH)
    assert backend.pipeline(options) == standard_pipeline(backend.capabilities, options, offered=[CUSTOM_RMSNORM])
    assert not {"float32"} & backend.capabilities.dtypes  # computes in fp16: the pipeline clips constants
    assert backend.capabilities.executes("com.qti.aisw.onnx", "CustomRMSNorm")
    assert backend.capabilities.retained_state and not backend.capabilities.runs_node_by_node
    reports = json.loads((bundle("llama") / "passes.json").read_text())
    assert [r["name"] for r in reports] == [s.name for s in backend.pipeline(options)]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_bundle_onnx_passes_the_full_checker(bundle, arch):
    onnx.checker.check_model(str(bundle(arch) / "model.onnx"), full_check=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_io_dimensions_are_the_specialization_symbols(bundle, arch):
    graph = onnx.load(str(bundle(arch) / "model.onnx"), load_external_data=False).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    for value in list(graph.input) + list(graph.output):
        if value.name in ("input_ids", "position_ids"):
            assert dims(value) == ["batch_size", "seq_len"]
        elif value.name == "logits":
            assert dims(value)[:2] == ["batch_size", "seq_len"]
        else:
            assert dims(value)[0] == "batch_size" and dims(value)[2] == "ctx_len", value.name


def _needs_pass(name: str):
    return pytest.mark.skipif(
        name not in pass_registry(), reason=f"pass {name!r} is not registered yet (written concurrently)"
    )


@_needs_pass("rmsnorm-fuse")
@pytest.mark.parametrize("arch, expected", [("llama", 2 * N_LAYERS + 1), ("gpt2", 0)])
def test_rmsnorm_is_the_custom_rmsnorm_function(bundle, arch, expected):
    model = onnx.load(str(bundle(arch) / "model.onnx"), load_external_data=False)
    calls = [n for n in model.graph.node if (n.domain, n.op_type) == ("com.qti.aisw.onnx", "CustomRMSNorm")]
    assert len(calls) == expected
    functions = {(f.domain, f.name) for f in model.functions}
    assert (("com.qti.aisw.onnx", "CustomRMSNorm") in functions) == bool(expected)
    if expected:
        assert {"Pow", "ReduceMean"}.isdisjoint(n.op_type for n in model.graph.node)
        assert all(a.name == "epsilon" and a.type == onnx.AttributeProto.FLOAT for n in calls for a in n.attribute)


@_needs_pass("fp16-clip")
@pytest.mark.parametrize("arch", ARCHS)
def test_float_constants_fit_in_fp16(bundle, arch):
    model = ir.load(bundle(arch) / "model.onnx")
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value is not None]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and "value" in node.attributes:
            arrays.append(node.attributes["value"].value.numpy())
    floats = [a for a in arrays if a.dtype == np.float32]
    assert floats
    for array in floats:
        finite = array[np.isfinite(array)]
        assert finite.size == 0 or np.abs(finite).max() <= FP16_MAX


class ShapeChecked:
    """Refuses any run whose shapes are not one of the bundle's specializations (what the card would do)."""

    def __init__(self, session: OrtDecoderSession, directory: Path):
        self.session = session
        specs = json.loads((directory / "specializations.json").read_text())["specializations"]
        self.allowed = {(int(s["batch_size"]), int(s["seq_len"])) for s in specs}
        self.ctx_len, self.prefill_seq_len = session.ctx_len, session.prefill_seq_len
        self.logits_positions = session.logits_positions

    @property
    def device_seconds(self) -> float:
        return self.session.device_seconds

    def reset(self, batch_size: int) -> None:
        self.session.reset(batch_size)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        assert input_ids.shape in self.allowed, f"no specialization for shape {input_ids.shape}"
        return self.session.run(input_ids, position_ids)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size, prompts", [(1, [MY_NAME]), (2, [MY_NAME, LONG_PROMPT])])
def test_the_bundle_graph_gives_hf_greedy_tokens_on_ort(
    bundle, qeff_model, tokenizer, tmp_path, arch, batch_size, prompts
):
    directory = bundle(arch, batch_size=batch_size)
    session = ShapeChecked(bundle_session(directory, tmp_path), directory)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert max(map(len, prompt_ids)) > PREFILL or batch_size == 1, "the batch case must prefill in two chunks"
    generated, _, _ = greedy_generate(session, prompt_ids, manifest(directory)["batch_size"], NEW_TOKENS, {3})
    assert generated == [hf_greedy(qeff_model(arch).model, tokenizer, p) for p in prompts]


def test_the_speculative_bundle_graph_verifies_guesses_in_its_specializations(bundle, qeff_model, tokenizer, tmp_path):
    """Greedy with prompt lookup through the bundle's graph on ORT, every run a specialization's shape."""
    from qgraph.decoding import GenerationOptions
    from qgraph.proposers import PromptLookup
    from qgraph.request import Request
    from qgraph.runtime import StepTimer
    from qgraph.speculative import speculative_batch_steps

    directory = bundle("llama", num_speculative_tokens=3)
    session = ShapeChecked(bundle_session(directory, tmp_path), directory)
    prompts = [MY_NAME, LONG_PROMPT]
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, eos_token_ids=frozenset({3}))
    requests = [Request(tokenizer(p)["input_ids"], options, CTX, index=i) for i, p in enumerate(prompts)]
    timer = StepTimer()
    for _ in speculative_batch_steps(session, requests, BATCH, 0, timer, PromptLookup(3), 3):
        pass
    assert [r.generated for r in requests] == [hf_greedy(qeff_model("llama").model, tokenizer, p) for p in prompts]
    assert timer.proposed > 0


# -- with and without the SDK's compiler ------------------------------------------------------------------------


@no_sdk
def test_without_the_sdk_the_bundle_is_written_and_generate_says_what_it_needs(bundle, qeff_model, tokenizer):
    directory = bundle("gpt2")
    assert manifest(directory)["compiled"] is False
    assert not (directory / "qpc").exists()
    with pytest.raises(BackendUnavailableError) as info:
        qeff_model("gpt2").generate(tokenizer, [MY_NAME], verbose=False)
    message = str(info.value)
    assert "needs the card and its SDK" in message and str(directory) in message and "compile.sh" in message


def test_a_compiler_given_as_an_option_is_run_on_the_bundle(bundle, tmp_path):
    compiler = write_fake_compiler(tmp_path)
    directory = bundle("llama", compiler=str(compiler), mxfp6_matmul=True)
    assert manifest(directory)["compiled"] is True
    assert (directory / "qpc" / "programqpc.bin").is_file()
    assert json.loads((directory / "argv.json").read_text()) == manifest(directory)["command"]
    assert manifest(directory)["command"][0] == str(compiler)


def test_a_failing_compiler_is_reported_with_its_output_and_publishes_nothing(qeff_model, tmp_path, cache_dir):
    compiler = write_fake_compiler(tmp_path)
    before = set((cache_dir / "compiled").iterdir())
    with pytest.raises(QGraphError, match="asked to fail") as info:
        qeff_model("gpt2").compile(
            backend="ai100",
            prefill_seq_len=PREFILL,
            ctx_len=CTX,
            compiler=str(compiler),
            compiler_options={"fail": True},
        )
    assert "the Cloud AI 100 compiler failed (exit 1)" in str(info.value)
    assert set((cache_dir / "compiled").iterdir()) == before


def test_a_missing_compiler_option_is_an_error(qeff_model, tmp_path):
    with pytest.raises(QGraphError, match="no executable file there"):
        qeff_model("gpt2").compile(backend="ai100", compiler=str(tmp_path / "nope"))


@no_sdk
def test_cli_infer_without_the_sdk_ends_with_a_message_and_a_usable_bundle(
    tiny_model_dir, tokenizer, cache_dir, tmp_path, capsys
):
    tokenizer.save_pretrained(tmp_path / "tok")
    argv = [
        "infer",
        "--backend",
        "ai100",
        "--model",
        str(tiny_model_dir("llama")),
        "--tokenizer",
        str(tmp_path / "tok"),
    ]
    argv += ["--prompt", MY_NAME, "--prompt-len", "8", "--ctx-len", "32", "--num-cores", "14"]
    argv += ["--option", "mxfp6_matmul=true", "--option", "mos=1", "--cache-dir", str(cache_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "no Cloud AI 100 compiler here" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: generating on Cloud AI 100 needs the card and its SDK")
    directory = Path(last.split("copy ", 1)[1].split(" to a machine", 1)[0])
    assert {"model.onnx", "specializations.json", "custom_io.yaml", "compile.sh", "bundle.json"} <= {
        p.name for p in directory.iterdir()
    }
    command = manifest(directory)["command"]
    assert {"-aic-num-cores=14", "-mxfp6-matmul", "-mos=1"} <= set(command)
    onnx.checker.check_model(str(directory / "model.onnx"), full_check=True)
