"""Backbone families: where CLS and patch tokens are, per family (checked against a forward pass made by
hand), inputs of other sizes, DINOv3 without torchvision and through ONNX Runtime, and clear refusals
(a gated repo, a ConvNeXt, a model that is not a DINO)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image

from dino_demo import model as model_module
from dino_demo.backbones import FAMILIES, REFUSED, family_of
from dino_demo.errors import UserError
from dino_demo.model import Embedder, ModelLoadError, prepare_image

FAMILY_FIXTURES = {"tiny_vit": ("vit", 0), "tiny_dinov2": ("dinov2", 0), "tiny_registers": ("dinov2_with_registers", 4),
                   "tiny_dinov3": ("dinov3_vit", 4)}


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_cls_and_patch_vectors_come_from_the_right_tokens_and_attention_skips_the_registers(request, fixture):
    model_type, registers = FAMILY_FIXTURES[fixture]
    embedder = Embedder(str(request.getfixturevalue(fixture)), device="cpu", backend="torch")
    assert embedder.model_type == model_type and embedder.num_prefix_tokens == 1 + registers
    image = make_image(5, (90, 60))
    pixels = prepare_image(image, embedder.input_size)[None]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # the forward, by hand
    x = (x - embedder._mean) / embedder._std
    with torch.inference_mode():
        out = embedder.model(pixel_values=x, output_attentions=False, **FAMILIES[model_type].forward)
    hidden = torch.nn.functional.normalize(out.last_hidden_state.float(), dim=-1)[0].numpy()
    assert hidden.shape[0] == 1 + registers + 16  # CLS, registers, a 4 x 4 grid
    features = embedder.embed([image])
    np.testing.assert_allclose(features.cls[0], hidden[0], atol=1e-5)
    np.testing.assert_allclose(features.patches[0], hidden[1 + registers:], atol=1e-5)
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(str(request.getfixturevalue(fixture)), attn_implementation="eager",
                                      **FAMILIES[model_type].load).eval()  # every layer eager, as transformers has it
    with torch.inference_mode():
        attentions = plain(pixel_values=x, output_attentions=True, **FAMILIES[model_type].forward).attentions
    assert len(attentions) == 2
    want = attentions[-1][0, :, 0, 1 + registers:].reshape(-1, 4, 4).numpy()
    np.testing.assert_allclose(embedder.attention(image), want, atol=1e-5)
    attended = embedder.attend([image])  # features from the same pass: the model's own
    np.testing.assert_allclose(attended.features.patches[0], hidden[1 + registers:], atol=1e-5)


@pytest.mark.parametrize("fixture, size", [("tiny_dinov3", 96), ("tiny_dinov2", 112), ("tiny_vit", 96)])
def test_inputs_of_other_sizes_give_finer_grids(request, fixture, size):
    embedder = Embedder(str(request.getfixturevalue(fixture)), device="cpu", input_size=size, backend="torch")
    side = size // embedder.patch_size
    features = embedder.embed([make_image(1, (120, 80))])
    assert embedder.grid == (side, side) and features.patches.shape[1] == side * side
    assert embedder.describe()["input_size"] == size


@pytest.mark.parametrize("fixture", ["tiny_dinov3", "tiny_dinov2", "tiny_vit"])
def test_the_same_weights_at_another_input_size_give_what_a_model_loaded_at_it_gives(request, fixture):
    """Matching's own input size (Engine.match_embedder): the backbone is not loaded twice, and the features
    at the new size are those of the model loaded at that size; the original keeps its own."""
    folder = str(request.getfixturevalue(fixture))
    base = Embedder(folder, device="cpu", backend="torch")
    size = 2 * base.input_size
    big = base.at_input_size(size)
    assert big.model is base.model and base.at_input_size(None) is base and base.at_input_size(base.input_size) is base
    side = size // base.patch_size
    assert big.grid == (side, side) and base.grid == (side // 2, side // 2) and big.describe()["input_size"] == size
    image = make_image(2, (130, 90))
    loaded = Embedder(folder, device="cpu", backend="torch", input_size=size).embed([image])
    got = big.embed([image])
    np.testing.assert_allclose(got.patches, loaded.patches, atol=1e-5)
    np.testing.assert_allclose(got.cls, loaded.cls, atol=1e-5)
    assert base.embed([image]).patches.shape[1] == (side // 2) ** 2
    assert big.attend([image]).attention.shape[-2:] == (side, side)
    with pytest.raises(UserError, match=f"not a multiple of the patch size {base.patch_size}"):
        base.at_input_size(size + 1)


def test_another_input_size_on_onnx_runtime_gets_its_own_checked_export(tiny_vit, tmp_path):
    base = Embedder(str(tiny_vit), device="cpu", backend="onnx", cache_dir=tmp_path)
    big = base.at_input_size(128)
    assert big.backend == "onnx" and big._onnx is not base._onnx
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "onnx").glob("*.onnx")) == ["128", "64"]
    image = make_image(4, (100, 70))
    exact = Embedder(str(tiny_vit), device="cpu", backend="torch", input_size=128).embed([image])
    got = big.embed([image])
    assert got.patches.shape == exact.patches.shape == (1, 64, exact.patches.shape[-1])
    assert (np.einsum("npd,npd->np", got.patches, exact.patches) >= 0.99).all()


def test_dinov3_loads_without_torchvision_and_runs_through_onnx_runtime_like_torch(tiny_dinov3, tmp_path):
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  (the pinned set leaves it out; its processor class needs it)
    exact = Embedder(str(tiny_dinov3), device="cpu", backend="torch")
    fast = Embedder(str(tiny_dinov3), device="cpu", backend="auto", cache_dir=tmp_path)
    assert fast.backend.startswith("onnx")
    images = [make_image(i, (70, 90)) for i in range(3)]
    a, b = exact.embed(images), fast.embed(images)
    assert (np.einsum("nd,nd->n", a.cls, b.cls) >= 0.99).all()
    assert (np.einsum("npd,npd->np", a.patches, b.patches) >= 0.99).all()  # per token, as the export check


def test_the_processors_own_normalisation_is_used(tiny_dinov3, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_dinov3, tmp_path / "sat-like")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update(image_mean=[0.43, 0.41, 0.31], image_std=[0.25, 0.2, 0.2])  # as the satellite model's differs
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    embedder = Embedder(str(folder), device="cpu", backend="torch")
    assert embedder._mean.flatten().tolist() == pytest.approx([0.43, 0.41, 0.31])
    assert embedder._std.flatten().tolist() == pytest.approx([0.25, 0.2, 0.2])


def test_a_gated_repo_says_to_accept_the_licence_and_set_a_token_in_one_line(monkeypatch):
    import httpx
    from huggingface_hub.errors import GatedRepoError

    def gated(source, kwargs):  # what transformers raises when the hub answers 401 for a gated repo
        response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/x/resolve/main/config.json"))
        try:
            raise GatedRepoError("401 Client Error. Cannot access gated repo.", response=response)
        except GatedRepoError as e:
            raise OSError("You are trying to access a gated repo.") from e

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setattr(model_module, "_from_pretrained", gated)
    monkeypatch.setattr(model_module, "require_hub", lambda *a: None)
    with pytest.raises(ModelLoadError) as caught:
        Embedder("facebook/dinov3-vits16-pretrain-lvd1689m", device="cpu")
    message = str(caught.value)
    assert "accept its licence at https://huggingface.co/facebook/dinov3-vits16-pretrain-lvd1689m" in message
    assert "HF_TOKEN" in message and "hf_secret_value_123" not in message and "\n" not in message


def test_a_convnext_or_a_model_that_is_not_a_dino_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="DINOv3 ConvNeXt") as caught:
        family_of("dinov3_convnext", "facebook/dinov3-convnext-tiny-pretrain-lvd1689m")
    assert "dinov3-vits16" in str(caught.value) and "dinov3_convnext" in REFUSED
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="is a 'bert' model, not a DINO") as caught:
        Embedder(str(tmp_path / "bert"), device="cpu")
    assert "\n" not in str(caught.value)


def test_the_app_serves_all_three_endpoints_on_a_dinov3_index(tiny_dinov3, tmp_path):
    """The bundled collection indexed with a tiny DINOv3 at 224 px (rotary positions: a 14 x 14 grid from a
    model made at 64), served with the real face gate, called through gradio_client."""
    from conftest import ROOT, free_port
    from gradio_client import Client, handle_file

    from app import open_engine
    from dino_demo.config import Settings
    from dino_demo.ui import build_ui, launch_options

    settings = Settings(model=str(tiny_dinov3), device="cpu", input_size=224, k=4, port=free_port(),
                        host="127.0.0.1", cache_dir=tmp_path / "cache")
    engine = open_engine(settings)
    assert engine.embedder.model_type == "dinov3_vit" and engine.embedder.grid == (14, 14)
    assert engine.index.manifest["model"]["type"] == "dinov3_vit"
    demo = build_ui(engine, settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings, engine))
    try:
        client = Client(f"http://127.0.0.1:{settings.port}/", verbose=False, download_files=False)
        marigold = handle_file(str(ROOT / "assets" / "collection" / "mate-red-marigold.jpg"))
        _, found = client.predict(marigold, 4, api_name="/search_image")
        assert len(found["results"]) == 4 and found["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        _, regions = client.predict(marigold, 100, 60, 300, 260, 4, True, api_name="/search_region")
        assert len(regions["results"]) == 4 and all("box" in hit for hit in regions["results"])
        _, summary, matched = client.predict(marigold, marigold, None, None, None, None, 10, api_name="/match_patches")
        assert matched["count"] == 196 and len(matched["pairs"]) == 10  # every patch matches itself
    finally:
        demo.close()


def test_the_caption_of_attention_maps_says_whether_to_expect_artefacts():
    from dino_demo.backbones import describe_registers

    assert "without registers" in describe_registers("dinov2", 0) and "artefacts" in describe_registers("dinov2", 0)
    assert describe_registers("dinov2_with_registers", 4).endswith("4 registers, so the attention stays on the objects")
    assert describe_registers("dinov3_vit", 4).startswith("DINOv3: 4 registers")
    assert describe_registers("vit", 0) == "DINO"  # DINO's small ViTs show no such artefacts


def test_a_model_of_billions_of_weights_warns_of_its_memory_before_it_is_used(tiny_dinov3, monkeypatch, caplog):
    """The ViT-7B (6.7 billion weights) gets one warning with the memory it needs; the tiny model stands in,
    the threshold lowered below its size."""
    import logging

    weights = sum(p.numel() for p in Embedder(str(tiny_dinov3), device="cpu", backend="torch").model.parameters())
    monkeypatch.setattr(model_module, "LARGE_PARAMETERS", weights - 1)
    with caplog.at_level(logging.WARNING, logger=model_module.log.name):
        Embedder(str(tiny_dinov3), device="cpu", backend="torch")
    (record,) = [r for r in caplog.records if "billion weights" in r.getMessage()]
    assert f"{weights / 1e9:.1f} billion weights: about" in record.getMessage() and "GB of memory in float32" in record.getMessage()
    caplog.clear()
    monkeypatch.setattr(model_module, "LARGE_PARAMETERS", weights)
    with caplog.at_level(logging.WARNING, logger=model_module.log.name):
        Embedder(str(tiny_dinov3), device="cpu", backend="torch")
    assert not [r for r in caplog.records if "billion weights" in r.getMessage()]
