"""ONNX export of the three graphs, model.json record, staleness, and the backend self-test."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from cinesr.worker.inference.engines import load_model
from cinesr.worker.inference.engines.parity import export_tensorrt, selftest
from cinesr.worker.inference.graphs import GRAPHS, OPSET, ensure_onnx, export_bundle, onnx_record


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_bundle("tiny", tmp_path_factory.mktemp("bundle"), batch_sizes=(1, 4))


def test_export_writes_graphs_and_record(exported):
    for g in GRAPHS:
        assert (exported / f"{g}.onnx").stat().st_size > 10_000
    meta = json.loads((exported / "model.json").read_text())
    rec = meta["onnx"]
    assert rec["opset"] == OPSET and rec["batch"] == "dynamic" and rec["batch_sizes"] == [1, 4]
    assert rec["io"]["unet"]["inputs"]["lq"] == ["B", 3, 64, 64]
    assert rec["io"]["decoder"]["outputs"]["images"] == ["B", 3, 256, 256]
    assert rec["source_weights_sha256"] == load_model("tiny").weights_hash
    assert meta["config"]["name"] == "tiny"  # a graphs-only folder keeps what is needed to run it
    assert onnx_record(exported) == rec


def test_graphs_have_dynamic_batch_and_fixed_window(exported):
    m = onnx.load(str(exported / "unet.onnx"))
    onnx.checker.check_model(m)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    c = load_model("tiny").geometry.latent_channels
    assert dims == {"x": ["batch", c, 64, 64], "t": ["batch"], "lq": ["batch", 3, 64, 64]}
    assert m.opset_import[0].version == OPSET


def test_exported_graphs_run_at_other_batches(exported):
    import onnxruntime as ort

    s = ort.InferenceSession(str(exported / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        out = s.run(None, {"images": np.zeros((b, 3, 256, 256), np.float32)})[0]
        assert out.shape == (b, load_model("tiny").geometry.latent_channels, 64, 64)


def test_ensure_onnx_reexports_stale_graphs(exported, tmp_path):
    d = export_bundle("tiny", tmp_path / "b", batch_sizes=(1,))
    before = (d / "unet.onnx").read_bytes()
    assert ensure_onnx(load_model("tiny", seed=0), d) == d
    assert (d / "unet.onnx").read_bytes() == before  # current: untouched
    other = load_model("tiny", seed=5)
    ensure_onnx(other, d)
    assert onnx_record(d)["source_weights_sha256"] == other.weights_hash
    assert (d / "unet.onnx").read_bytes() != before


def test_selftest_torch_against_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setenv("CINESR_CACHE_DIR", str(tmp_path))
    report = selftest("torch", "cpu", model="tiny", batch=1)
    assert report["ok"], report
    assert report["engine"]["backend"] == "torch" and report["reference"]["backend"] == "onnx"
    assert report["differences"]["unet_max_abs"] < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_export_tensorrt_says_why_not():
    result = export_tensorrt("tiny")
    assert result["built"] is False and "tensorrt" in result["reason"]


def test_export_into_a_model_bundle(tmp_path, monkeypatch):
    """A bundle folder (model.bundle format): graphs go next to the weights, model.json keeps its keys,
    and engines then use the bundle's own graphs instead of the cache."""
    from cinesr.model.bundle import load_bundle, save_bundle
    from cinesr.worker.inference.engines import create_engine

    monkeypatch.setenv("CINESR_CACHE_DIR", str(tmp_path / "cache"))
    net = load_model("tiny", seed=3)
    bundle = save_bundle(tmp_path / "bundle", net.unet, net.vqgan, net.config, meta={"name": "t"})
    model = load_model(bundle)
    assert model.source["kind"] == "bundle" and model.source["version"].startswith("t-")
    engine = create_engine("onnx", "cpu", model)
    assert engine.onnx_dir.is_relative_to(tmp_path / "cache")  # not exported yet: the cache
    export_bundle(bundle)
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["format"] == "cinesr-model-bundle" and meta["onnx"]["source_weights_sha256"] == model.weights_hash
    assert load_bundle(bundle).version == model.source["version"]  # still a loadable bundle
    assert create_engine("onnx", "cpu", load_model(bundle)).onnx_dir == bundle
