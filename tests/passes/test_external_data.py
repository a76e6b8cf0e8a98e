"""qgraph.external_data: models save with tensors in external files split by size and load back; a graph over the
2 GiB protobuf limit goes through a pass pipeline and back to disk."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.external_data import PROTOBUF_LIMIT, external_files, load_model, save_model, tensor_bytes
from qgraph.pass_manager import PassSpec, run_pipeline
from qgraph.verify import run_on_ort


def _gather_model(arrays: dict[str, np.ndarray]) -> ir.Model:
    """``y_i = Gather(w_i, idx)`` for every initializer ``w_i``: each tensor is used, none is foldable."""
    idx = ir.val("idx", ir.DataType.INT64, [2])
    nodes, outputs, initializers = [], [], []
    for name, array in arrays.items():
        weight = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape))
        weight.const_value = ir.tensor(array, name=name)
        initializers.append(weight)
        node = ir.node("Gather", [weight, idx])
        out = node.outputs[0]
        out.name, out.type, out.shape = f"y_{name}", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2])
        nodes.append(node)
        outputs.append(out)
    graph = ir.Graph([idx], outputs, nodes=nodes, initializers=initializers, opset_imports={"": 20}, name="g")
    return ir.Model(graph, ir_version=10)


def _small() -> dict[str, np.ndarray]:
    return {f"w{i}": np.arange(2048, dtype=np.float32) + i for i in range(3)}  # 8 KiB each


def test_tensors_are_split_into_files_by_size_and_load_back(tmp_path):
    path = tmp_path / "model.onnx"
    written = save_model(_gather_model(_small()), path, external=True, shard_bytes=10_000)
    assert written[0] == path and len(written) == 4, "one 8 KiB tensor per 10 KB file"
    assert [p.name for p in written[1:]] == external_files(path) and all(p.is_file() for p in written)
    loaded = load_model(path)
    for name, array in _small().items():
        np.testing.assert_array_equal(loaded.graph.initializers[name].const_value.numpy(), array)
    assert run_on_ort(loaded, {"idx": np.array([0, 5])})["y_w2"].tolist() == [2.0, 7.0]


def test_saving_over_its_own_files_replaces_them_and_removes_stale_shards(tmp_path):
    path = tmp_path / "model.onnx"
    old = save_model(_gather_model(_small()), path, external=True, shard_bytes=10_000)
    model = load_model(path)  # its tensors are read from the files about to be replaced
    written = save_model(model, path, external=True, shard_bytes=None)
    assert len(written) == 2 and not any(p.exists() for p in old[1:] if p not in written)
    for name, array in _small().items():
        np.testing.assert_array_equal(load_model(path).graph.initializers[name].const_value.numpy(), array)


def test_small_models_stay_in_one_file_unless_told(tmp_path):
    written = save_model(_gather_model(_small()), tmp_path / "m.onnx")
    assert written == [tmp_path / "m.onnx"] and external_files(tmp_path / "m.onnx") == []


def test_a_graph_over_2gb_goes_through_a_pipeline_and_back_to_disk(tmp_path):
    sizes = {"w0": 200_000_000, "w1": 200_000_001, "w2": 200_000_002}  # float32: 2.4 GB, three shapes (no dedup)
    arrays = {name: np.full(n, float(i + 1), np.float32) for i, (name, n) in enumerate(sizes.items())}
    arrays["w0"][0] = 1e10  # out of the float16 range: fp16-clip must see it
    model = _gather_model(arrays)
    del arrays
    assert tensor_bytes(model) > PROTOBUF_LIMIT
    directory = tmp_path / "big"
    try:
        reports = run_pipeline(model, [PassSpec("rmsnorm-fuse"), PassSpec("fp16-clip"), PassSpec("cleanup")])
        assert reports[1].counts["values_clipped"] == 1
        written = save_model(model, directory / "model.onnx", shard_bytes=1 << 30)
        del model
        assert len(written) == 4, "2.4 GB in 1 GiB files: three data files (one tensor each)"
        loaded = load_model(directory / "model.onnx")
        assert tensor_bytes(loaded) > PROTOBUF_LIMIT
        w0, w2 = (loaded.graph.initializers[n].const_value for n in ("w0", "w2"))
        assert w0.numpy()[:2].tolist() == [65504.0, 1.0] and w2.numpy()[-1] == 3.0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("external", [True, False])
def test_round_trip_keeps_the_graph(tmp_path, external):
    model = _gather_model(_small())
    save_model(model, tmp_path / "m.onnx", external=external)
    loaded = load_model(tmp_path / "m.onnx")
    assert [n.op_type for n in loaded.graph] == ["Gather"] * 3
    assert [v.name for v in loaded.graph.outputs] == ["y_w0", "y_w1", "y_w2"]
