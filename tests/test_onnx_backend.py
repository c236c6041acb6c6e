import logging
import sys

import numpy as np
import torch
import pytest

from conftest import make_image
from dino_demo.errors import UserError
from dino_demo.model import Embedder
from dino_demo.onnx_backend import BackendUnavailable, backend_order, load_onnx_model

IMAGES = [make_image(i, (80 + 9 * i, 60)) for i in range(3)]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-vector cosine (both are L2-normalised already)."""
    return np.sum(a * b, axis=-1)


@pytest.mark.parametrize("fixture, backend", [
    ("tiny_vit", "onnx"), ("tiny_vit", "onnx-int8"), ("tiny_dinov2", "onnx"), ("tiny_dinov2", "onnx-int8"),
    ("tiny_registers", "onnx"),  # its position embeddings go through an antialiased resize we export
])
def test_onnx_backends_give_the_torch_features(request, tmp_path, fixture, backend):
    folder = str(request.getfixturevalue(fixture))
    plain = Embedder(folder, device="cpu").embed(IMAGES)
    fast = Embedder(folder, device="cpu", backend=backend, cache_dir=tmp_path, batch_size=2)
    assert fast.backend == backend
    features = fast.embed(IMAGES)  # batches of 2 then 1: the exported batch axis is dynamic
    assert features.cls.shape == plain.cls.shape and features.patches.shape == plain.patches.shape
    assert features.grid == plain.grid and features.sizes == plain.sizes
    assert cosines(features.cls, plain.cls).min() >= 0.99
    assert cosines(features.patches, plain.patches).min() >= 0.99
    np.testing.assert_allclose(np.linalg.norm(features.patches, axis=-1), 1, atol=1e-5)
    if backend == "onnx-int8":  # close, but not torch's own numbers: the int8 session really ran
        assert np.abs(features.patches - plain.patches).max() > 1e-4


def test_without_onnxruntime_auto_falls_back_to_torch_with_one_warning(tiny_vit, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is missing
    with caplog.at_level(logging.WARNING):
        embedder = Embedder(str(tiny_vit), device="cpu", backend="auto", cache_dir=tmp_path)
    assert embedder.backend == "torch"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and all("onnxruntime" in m and "\n" not in m for m in warned)
    assert "using torch" in warned[-1]
    expected = Embedder(str(tiny_vit), device="cpu").embed(IMAGES)
    np.testing.assert_allclose(embedder.embed(IMAGES).cls, expected.cls, atol=1e-6)
    assert not (tmp_path / "onnx").exists()  # nothing exported


def test_a_failed_export_falls_back_to_torch(tiny_vit, tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        embedder = Embedder(str(tiny_vit), device="cpu", backend="onnx", cache_dir=blocked)
    assert embedder.backend == "torch"
    assert any("export failed" in r.getMessage() for r in caplog.records)
    assert embedder.embed(IMAGES).cls.shape == (3, 32)


def test_the_export_is_cached_and_reused(tiny_vit, tmp_path):
    first = Embedder(str(tiny_vit), device="cpu", backend="onnx-int8", cache_dir=tmp_path)
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "onnx").iterdir()}
    assert first._onnx.path.name in made and len(made) == 2  # the model and its check verdict
    second = Embedder(str(tiny_vit), device="cpu", backend="onnx-int8", cache_dir=tmp_path)
    assert second._onnx.path == first._onnx.path and second._onnx.cosine == first._onnx.cosine
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "onnx").iterdir()} == made  # nothing rewritten
    np.testing.assert_allclose(second.embed(IMAGES).cls, first.embed(IMAGES).cls, atol=1e-6)
    other_size = Embedder(str(tiny_vit), device="cpu", backend="onnx-int8", cache_dir=tmp_path, input_size=96)
    assert other_size._onnx.path != first._onnx.path  # the input size is part of the key
    assert other_size.embed(IMAGES).patches.shape[1] == 36
    options = first._onnx.session.get_session_options()  # idle threads sleep: they would hold the cores
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_an_export_further_than_the_minimum_cosine_is_refused_and_remembered(tiny_vit, tmp_path):
    model = Embedder(str(tiny_vit), device="cpu")
    with pytest.raises(BackendUnavailable, match="too far from float32"):
        load_onnx_model(model.model, 64, "onnx-int8", tmp_path, model._interpolate, min_cosine=1.01)
    made = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(BackendUnavailable, match="too far from float32"):
        load_onnx_model(model.model, 64, "onnx-int8", tmp_path, model._interpolate, min_cosine=1.01)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == made  # the cached verdict, no new export
    assert load_onnx_model(model.model, 64, "onnx-int8", tmp_path, model._interpolate).cosine > 0.99


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_registers", "tiny_dinov3"])
def test_attention_and_features_from_the_onnx_attention_export_are_torchs(request, tmp_path, fixture):
    folder = str(request.getfixturevalue(fixture))
    fast = Embedder(folder, device="cpu", backend="onnx", cache_dir=tmp_path, batch_size=2)
    plain = Embedder(folder, device="cpu", backend="torch")
    got, want = fast.attend(IMAGES[:3]), plain.attend(IMAGES[:3])  # two batches
    assert fast._onnx_attention is not None
    np.testing.assert_allclose(got.attention, want.attention, atol=1e-5)
    np.testing.assert_allclose(got.features.patches, want.features.patches, atol=1e-4)
    # the export is made once and kept beside the plain one
    assert len(list((tmp_path / "onnx").glob("*.attention.onnx"))) == 1
    np.testing.assert_allclose(fast.embed(IMAGES[:1]).cls, plain.embed(IMAGES[:1]).cls, atol=1e-4)


def test_the_onnx_path_runs_no_torch_op(tiny_vit, tmp_path):
    """torch's threads spin after each op and take the cores ONNX Runtime needs: queries on ONNX stay in numpy."""
    fast = Embedder(str(tiny_vit), device="cpu", backend="onnx", cache_dir=tmp_path)
    want_features, want_attended = fast.embed(IMAGES[:2]), fast.attend(IMAGES[:1])
    ran = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            ran.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        features, attended = fast.embed(IMAGES[:2]), fast.attend(IMAGES[:1])
    assert ran == []
    np.testing.assert_array_equal(features.patches, want_features.patches)
    np.testing.assert_array_equal(attended.attention, want_attended.attention)
    assert features.cls.dtype == np.float32 and attended.attention.dtype == np.float32


def test_backend_order_tries_int8_then_float32_on_cpu_and_torch_alone_on_a_gpu():
    assert backend_order("auto", "cpu") == ["onnx-int8", "onnx"]
    assert backend_order("onnx-int8", "cpu") == ["onnx-int8", "onnx"]
    assert backend_order("onnx", "cpu") == ["onnx"]
    assert backend_order("torch", "cpu") == [] and backend_order("auto", "cuda") == []
    with pytest.raises(UserError, match="--device cpu"):
        backend_order("onnx-int8", "cuda")
    with pytest.raises(UserError, match="auto, torch, onnx, onnx-int8"):
        backend_order("tensorrt", "cpu")


def test_the_backend_comes_from_DINO_BACKEND_then_the_command_line():
    from app import load_settings
    from dino_demo.config import Settings, SettingsError

    assert Settings().backend == "auto"
    assert load_settings([], {"DINO_BACKEND": "onnx"}).backend == "onnx"
    assert load_settings(["--backend", "torch"], {"DINO_BACKEND": "onnx"}).backend == "torch"
    with pytest.raises(SettingsError, match="DINO_BACKEND|Unknown backend 'fast'"):
        Settings.from_env({"DINO_BACKEND": "fast"})


def test_the_app_engine_embeds_with_the_backend_it_is_given(tiny_vit, tmp_path):
    from dino_demo.config import Settings
    from app import open_engine
    from dino_demo.faces import NoFaceGate
    from conftest import write_imagefolder

    settings = Settings(model=str(tiny_vit), device="cpu", backend="onnx", cache_dir=tmp_path / "cache",
                        collection=write_imagefolder(tmp_path / "images", 4))
    engine = open_engine(settings, gate=NoFaceGate())
    assert engine.embedder.backend == "onnx"
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # exported under the app's cache folder
    top = engine.search_image(str(tmp_path / "images" / "img001.jpg"), 1).items[0]
    assert top.label == "picture 1" and top.score > 0.99  # an indexed image finds itself


def test_the_query_embed_benchmarks_int8_variants_run_and_stay_within_the_check(tiny_vit, tmp_path, monkeypatch):
    """benchmarks/query_embed.py times static int8 (calibrated on the shipped photos) and the dynamic export in
    other sessions against the app's backends; each must really be what it says and pass the app's check."""
    import onnx

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from query_embed import static_int8, with_session

    plain = Embedder(str(tiny_vit), device="cpu")
    want = plain.embed(IMAGES)
    static = static_int8(Embedder(str(tiny_vit), device="cpu", backend="onnx", cache_dir=tmp_path), plain)
    dynamic = Embedder(str(tiny_vit), device="cpu", backend="onnx-int8", cache_dir=tmp_path)
    one_thread = with_session(dynamic, "onnx-int8-1t", threads=1, spinning=False)
    assert (static.backend, one_thread.backend) == ("onnx-int8-static", "onnx-int8-1t")
    graph = onnx.load(static._onnx.path).graph
    dequantised = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    matmuls = [set(n.input) <= dequantised for n in graph.node if n.op_type == "MatMul"]
    assert (len(matmuls), sum(matmuls)) == (2 * 8, 2 * 6)  # per layer q, k, v, o, fc1, fc2 int8; attention's 2 float
    for fast in (static, one_thread):
        assert fast._onnx.cosine >= 0.99
        got = fast.embed(IMAGES)
        assert cosines(got.cls, want.cls).min() >= 0.99 and cosines(got.patches, want.patches).min() >= 0.99
        assert np.abs(got.patches - want.patches).max() > 1e-4  # an int8 session really ran
    np.testing.assert_allclose(one_thread.embed(IMAGES).cls, dynamic.embed(IMAGES).cls, atol=1e-5)  # same file
