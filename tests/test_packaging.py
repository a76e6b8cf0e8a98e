"""passes/ and backends/ install inside the qgraph namespace (editable and wheel), never as top-level packages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_folders_into_qgraph():
    import qgraph.backends.ort
    import qgraph.passes.kv_retained_state

    assert Path(qgraph.passes.kv_retained_state.__file__).resolve() == ROOT / "passes" / "kv_retained_state.py"
    assert Path(qgraph.backends.ort.__file__).resolve() == ROOT / "backends" / "ort.py"


def test_builtins_are_entry_points_of_the_installed_distribution():
    eps = distribution("qgraph").entry_points
    assert {ep.name for ep in eps if ep.group == "qgraph.passes"} >= {"kv-retained-state", "cleanup"}
    assert "ort" in {ep.name for ep in eps if ep.group == "qgraph.backends"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("qgraph-*.whl"))


def test_wheel_holds_passes_and_backends_under_qgraph_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "qgraph/passes/kv_retained_state.py" in names
    assert "qgraph/backends/ort.py" in names
    assert not [n for n in names if n.startswith(("passes/", "backends/"))]


def test_wheel_install_imports_the_namespaced_plugins(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import qgraph, qgraph.passes.kv_retained_state, qgraph.backends.ort, importlib.util as u;"
        "print(qgraph.__file__); print(u.find_spec('passes'), u.find_spec('backends'))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    qgraph_file, specs = done.stdout.splitlines()
    assert qgraph_file.startswith(str(target))
    assert specs == "None None"
