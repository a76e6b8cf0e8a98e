"""Fault injection for the artifact cache: every fault is followed by a normal run that must give HF's tokens.

Faults: a process SIGKILLed at each stage of export, compile and publish; each artifact file truncated, zeroed (same
size) or deleted; the marker removed; two processes publishing the same key at once; a read-only and a full cache.
After the normal run every entry must verify in full and no temporary of a dead writer may be left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cache import CacheError, entry_problem, publish
from tests.cache_faults_child import NEW_TOKENS, PROMPT
from tests.parity import hf_greedy

REPO = Path(__file__).resolve().parents[1]
COMPILE = dict(prefill_seq_len=8, ctx_len=40)


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dir):
    return tiny_model_dir("gpt2")


@pytest.fixture(scope="module")
def expected(gpt2_dir, tokenizer) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation="eager").eval()
    return hf_greedy(hf, tokenizer, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def pristine(gpt2_dir, tmp_path_factory) -> Path:
    """A cache holding the export and the compiled artifact, built once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("pristine-cache")
    QEFFAutoModelForCausalLM.from_pretrained(str(gpt2_dir), cache_dir=root, verbose=False).compile(**COMPILE)
    return root


@pytest.fixture
def cache(pristine, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(pristine, root)  # copy2: mtimes kept, so the copy verifies cheaply as the original does
    return root


def entry(root: Path, kind: str) -> Path:
    (directory,) = [d for d in (root / kind).iterdir() if not d.name.startswith(".")]
    return directory


def normal_run(gpt2_dir, root: Path, tokenizer, **compile_options) -> list[int]:
    model = QEFFAutoModelForCausalLM.from_pretrained(str(gpt2_dir), cache_dir=root, verbose=False)
    model.compile(**COMPILE, **compile_options)
    return model.generate(tokenizer, [PROMPT], generation_len=NEW_TOKENS, verbose=False).generated_ids[0]


def assert_cache_sound(root: Path) -> None:
    """Every entry verifies in full; nothing of a dead writer is left beside them."""
    for kind in ("exports", "compiled"):
        for child in (root / kind).iterdir():
            assert not child.name.startswith("."), f"leftover {child}"
            assert entry_problem(child, full=True) is None, child


def damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero":  # same size, the first megabyte (or all) zeroed: only the content digest can tell
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(bytes(min(size, 1 << 20)))


# -- damaged files ------------------------------------------------------------------------------------------------

COMPILED_FILES = ["model.onnx", "model.onnx.data", "ort_settings.json", "passes.json", "COMPLETE"]


@pytest.mark.parametrize("how", ["truncate", "zero", "delete"])
@pytest.mark.parametrize("name", COMPILED_FILES)
def test_a_damaged_compiled_artifact_is_rebuilt_not_used(name, how, cache, gpt2_dir, tokenizer, expected, caplog):
    damage(entry(cache, "compiled") / name, how)
    with caplog.at_level(logging.WARNING, logger="qgraph.cache"):
        assert normal_run(gpt2_dir, cache, tokenizer) == expected
    (notice,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "rebuilding" in notice and (name in notice or "COMPLETE" in notice)
    assert_cache_sound(cache)


@pytest.mark.parametrize(
    ("name", "how"), [("model.onnx.data", "zero"), ("model.onnx", "truncate"), ("COMPLETE", "delete")]
)
def test_a_damaged_export_is_exported_again_not_compiled(name, how, cache, gpt2_dir, tokenizer, expected):
    """The issue's case: a zeroed vanilla export was compiled into a new artifact published as complete."""
    damage(entry(cache, "exports") / name, how)
    shutil.rmtree(cache / "compiled")  # the compile must read the export
    assert normal_run(gpt2_dir, cache, tokenizer) == expected
    assert_cache_sound(cache)


def test_damage_that_kept_size_and_mtime_is_found_by_verify(cache, gpt2_dir, tokenizer, expected):
    data = entry(cache, "compiled") / "model.onnx.data"
    before = data.stat()
    damage(data, "zero")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert entry_problem(data.parent) is None, "the cheap check trusts size and mtime, as documented"
    assert normal_run(gpt2_dir, cache, tokenizer, verify=True) == expected
    assert_cache_sound(cache)


def test_an_artifact_damaged_after_compile_is_refused_at_load_then_rebuilt(cache, gpt2_dir, tokenizer, expected):
    model = QEFFAutoModelForCausalLM.from_pretrained(str(gpt2_dir), cache_dir=cache, verbose=False)
    model.compile(**COMPILE)
    (model.artifact.directory / "ort_settings.json").unlink()
    with pytest.raises(CacheError, match=r"changed after compile.*ort_settings.json is missing.*compile"):
        model.generate(tokenizer, [PROMPT], generation_len=NEW_TOKENS, verbose=False)
    model.compile(**COMPILE)
    assert model.generate(tokenizer, [PROMPT], generation_len=NEW_TOKENS, verbose=False).generated_ids[0] == expected


def test_a_copied_cache_verifies_once_and_records_the_new_mtimes(cache):
    directory = entry(cache, "compiled")
    os.utime(directory / "model.onnx.data")  # a copy without -p: new mtimes, same bytes
    assert entry_problem(directory) is None
    recorded = json.loads((directory / "COMPLETE").read_text())["files"]["model.onnx.data"]["mtime_ns"]
    assert recorded == (directory / "model.onnx.data").stat().st_mtime_ns


# -- killed processes ---------------------------------------------------------------------------------------------


def run_child(gpt2_dir, root: Path, stage: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cache_faults_child", str(gpt2_dir), str(root), stage, *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("start", "stage"),
    [
        ("empty", "write"),  # the export's files written, no marker
        ("exported", "passes"),  # killed while the passes ran
        ("exported", "write"),  # the compiled graph written, settings and marker not
        ("exported", "install"),  # the compiled artifact complete, not renamed (an export's publish is the same code)
        ("damaged", "set-aside"),  # a damaged entry renamed aside, not yet deleted
    ],
)
def test_a_killed_run_is_followed_by_a_normal_run(start, stage, cache, gpt2_dir, tokenizer, expected):
    if start == "empty":
        shutil.rmtree(cache)
    elif start == "exported":
        shutil.rmtree(cache / "compiled")
    else:
        (entry(cache, "compiled") / "COMPLETE").unlink()
    child = run_child(gpt2_dir, cache, stage)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -9, f"the child was not killed at {stage!r}: {err[-2000:]}"
    leftovers = [p for kind in ("exports", "compiled") if (cache / kind).is_dir() for p in (cache / kind).iterdir()]
    if stage != "passes":
        assert any(p.name.startswith(".") for p in leftovers), "the kill left nothing behind: the stage was missed"
    assert normal_run(gpt2_dir, cache, tokenizer) == expected
    assert_cache_sound(cache)


def test_two_processes_publishing_the_same_key_at_once(cache, gpt2_dir, tokenizer, expected, tmp_path):
    shutil.rmtree(cache / "compiled")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    children = [run_child(gpt2_dir, cache, "race", str(barrier), tokenizer.name_or_path) for _ in range(2)]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == expected
    assert len(list(barrier.iterdir())) == 2, "both processes reached the rename"
    assert len(list((cache / "compiled").iterdir())) == 1
    assert normal_run(gpt2_dir, cache, tokenizer) == expected
    assert_cache_sound(cache)


def test_a_live_writers_temporary_is_left_alone(cache, gpt2_dir, tokenizer, expected):
    with publish(cache / "compiled" / "in-progress") as tmp:
        assert normal_run(gpt2_dir, cache, tokenizer) == expected
        assert tmp.is_dir(), "another writer's work in progress was deleted"
    assert not tmp.exists()


# -- read-only and full caches ------------------------------------------------------------------------------------


def _inside(path, root: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(root)
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def unwritable(root: Path, code: int):
    """Within the block every write under ``root`` fails with ``code`` (the super-user ignores file modes, so the
    file system's refusal is simulated at the calls Python makes to write)."""
    root = root.resolve()

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def guard(func, *path_args):
        def guarded(*args, **kwargs):
            if any(_inside(args[i], root) for i in path_args if i < len(args)):
                refuse(args[path_args[0]])
            return func(*args, **kwargs)

        return guarded

    real_open, real_os_open = io.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and _inside(file, root):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path, root):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        if code == errno.EROFS:  # a read-only file system refuses directories and renames too
            monkeypatch.setattr(os, "mkdir", guard(os.mkdir, 0))
            monkeypatch.setattr(os, "rename", guard(os.rename, 0, 1))
            monkeypatch.setattr(os, "replace", guard(os.replace, 0, 1))
            monkeypatch.setattr(os, "unlink", guard(os.unlink, 0))
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr("builtins.open", open_)
        monkeypatch.setattr(os, "open", os_open)
        yield


def test_a_read_only_cache_is_used_as_it_is(cache, gpt2_dir, tokenizer, expected):
    os.utime(entry(cache, "compiled") / "model.onnx.data")  # needs a re-hash, whose record cannot be written
    with unwritable(cache, errno.EROFS):
        assert normal_run(gpt2_dir, cache, tokenizer) == expected


def test_a_read_only_cache_without_the_artifact_says_what_to_do(cache, gpt2_dir, tokenizer, expected):
    shutil.rmtree(cache / "compiled")
    with unwritable(cache, errno.EROFS):
        with pytest.raises(CacheError, match=r"read-only.*writable cache_dir"):
            normal_run(gpt2_dir, cache, tokenizer)
    assert not (cache / "compiled").exists() or not list((cache / "compiled").iterdir())
    assert normal_run(gpt2_dir, cache, tokenizer) == expected  # writable again: a normal run
    assert_cache_sound(cache)


def test_a_full_disk_fails_with_one_clear_error_and_leaves_nothing(cache, gpt2_dir, tokenizer, expected):
    shutil.rmtree(cache / "compiled")  # the compile must write (an export's publish is the same code)
    with unwritable(cache, errno.ENOSPC):
        with pytest.raises(CacheError, match=r"disk is full.*cache_dir"):
            normal_run(gpt2_dir, cache, tokenizer)
    assert [p for p in (cache / "compiled").rglob("*")] == []
    assert normal_run(gpt2_dir, cache, tokenizer) == expected
    assert_cache_sound(cache)


# -- where the cache is -------------------------------------------------------------------------------------------


def test_a_cache_dir_that_is_a_file_is_refused(tmp_path, gpt2_dir):
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    with pytest.raises(CacheError, match="is a file.*directory"):
        QEFFAutoModelForCausalLM.from_pretrained(str(gpt2_dir), cache_dir=file, verbose=False)


def test_a_tilde_cache_dir_is_the_home_directory(tmp_path, gpt2_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(gpt2_dir), cache_dir="~/qcache", verbose=False)
    assert model.cache_dir == tmp_path / "home" / "qcache"
    assert not (tmp_path / "~").exists()
