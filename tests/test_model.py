import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, make_image
from dino_demo.errors import HubUnreachable
from dino_demo.hub import hub_reachable
from dino_demo.model import Embedder, prepare_image


@pytest.mark.parametrize("fixture, grid, dim", [("tiny_vit", (4, 4), 32), ("tiny_dinov2", (4, 4), 32),
                                                ("tiny_registers", (4, 4), 32), ("tiny_dinov3", (4, 4), 32)])
def test_each_family_loads_from_a_folder_and_gives_normalised_features(request, fixture, grid, dim):
    embedder = Embedder(str(request.getfixturevalue(fixture)), device="cpu")
    images = [make_image(1, (90, 60)), make_image(2, (40, 130))]
    features = embedder.embed(images)
    assert embedder.grid == grid and embedder.dim == dim
    assert features.cls.shape == (2, dim)
    assert features.patches.shape == (2, grid[0] * grid[1], dim)
    np.testing.assert_allclose(np.linalg.norm(features.cls, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features.patches, axis=2), 1, atol=1e-5)
    assert features.sizes == [(90, 60), (40, 130)]


def test_registers_are_not_returned_as_patches(tiny_registers):
    embedder = Embedder(str(tiny_registers), device="cpu")
    assert embedder.num_prefix_tokens == 5
    assert embedder.embed([make_image(3)]).patches.shape[1] == 16


def test_one_image_of_a_batch_keeps_its_own_vectors_and_size(embedder):
    features = embedder.embed([make_image(1, (100, 50)), make_image(2, (30, 90))])
    second = features.one(1)
    assert second.sizes == [(30, 90)] and second.grid == features.grid
    np.testing.assert_array_equal(second.cls, features.cls[1:2])
    np.testing.assert_array_equal(second.patches, features.patches[1:2])


def test_a_batch_gives_the_same_features_as_one_by_one(embedder):
    images = [make_image(i, (80 + 7 * i, 60)) for i in range(5)]
    batched = embedder.embed(images)
    single = [embedder.embed([im]) for im in images]
    np.testing.assert_allclose(batched.cls, np.concatenate([s.cls for s in single]), atol=1e-5)
    np.testing.assert_allclose(batched.patches, np.concatenate([s.patches for s in single]), atol=1e-5)


def test_a_phone_photo_is_shrunk_by_blocks_first_and_keeps_its_features(embedder):
    from PIL import Image

    size = embedder.input_size
    small, phone = make_image(1, (3 * size, 2 * size)), make_image(1, (63 * size, 45 * size))  # 4032 x 2880
    whole = lambda im: np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))  # noqa: E731
    np.testing.assert_array_equal(prepare_image(small, size), whole(small))  # up to 3x the input: as before
    blocks = np.asarray(phone.reduce((21, 15)).resize((size, size), Image.Resampling.BICUBIC))  # 3x the input
    np.testing.assert_array_equal(prepare_image(phone, size), blocks)
    assert np.abs(blocks.astype(int) - whole(phone)).mean() < 1  # a level or two here and there
    prepared, resampled = (embedder.embed_prepared(p[None], [phone.size]) for p in (blocks, whole(phone)))
    assert prepared.cls[0] @ resampled.cls[0] >= 0.999
    assert np.einsum("npd,npd->np", prepared.patches, resampled.patches).min() >= 0.99


def test_different_images_give_different_features(embedder):
    features = embedder.embed([make_image(1), make_image(2)])
    assert features.cls[0] @ features.cls[1] < 0.999


def test_attention_map_covers_the_patch_grid_and_sums_below_one(embedder):
    attention = embedder.attention(make_image(4, (120, 80)))
    assert attention.shape == (2, 4, 4)  # heads, grid
    assert np.all(attention >= 0) and np.all(attention.sum(axis=(1, 2)) <= 1 + 1e-5)
    # switching to eager attention for the map must not change the features afterwards
    before = embedder.embed([make_image(5)]).cls
    embedder.attention(make_image(4))
    np.testing.assert_allclose(embedder.embed([make_image(5)]).cls, before, atol=1e-6)


def test_uncached_hub_model_offline_is_one_clear_error():
    started = time.perf_counter()
    with pytest.raises(HubUnreachable) as caught:
        Embedder("facebook/dino-vits16", device="cpu")
    message = str(caught.value)
    assert "facebook/dino-vits16" in message and "--model" in message and "\n" not in message
    assert time.perf_counter() - started < 15  # no half-minute of retries


def test_hub_reachable_tells_an_open_port_from_a_closed_one():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert hub_reachable(f"http://127.0.0.1:{port}")
    server.close()
    assert not hub_reachable(f"http://127.0.0.1:{port}", timeout=1)


def test_builder_cli_offline_prints_one_line_and_no_traceback(tmp_path, image_folder):
    result = subprocess.run(
        [sys.executable, "-m", "index_builder", "--dataset", str(image_folder),
         "--model", "facebook/dino-vits8", "--out", str(tmp_path / "idx")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "facebook/dino-vits8" in error_lines[0] and "--model" in error_lines[0]


def test_bfloat16_features_stay_close_to_float32(tiny_vit):
    images = [make_image(i, (70, 50)) for i in range(3)]
    full = Embedder(str(tiny_vit), device="cpu", bf16=False).embed(images)
    half = Embedder(str(tiny_vit), device="cpu", bf16=True)
    assert half.dtype.is_floating_point and str(half.dtype) == "torch.bfloat16"
    low = half.embed(images)
    assert low.cls.dtype == np.float32  # returned as float32 whatever the compute type
    assert np.min(np.sum(full.cls * low.cls, axis=1)) > 0.98


def test_attend_gives_features_and_attention_of_a_batch_as_one_by_one(embedder):
    images = [make_image(i, (80 + 9 * i, 60)) for i in range(11)]  # more than one batch of 8
    together = embedder.attend(images)
    assert together.attention.shape == (11, 2, 4, 4) and together.features.patches.shape == (11, 16, 32)
    assert together.features.sizes == [im.size for im in images]
    for i in (0, 10):
        alone = embedder.attend([images[i]])
        np.testing.assert_allclose(together.attention[i], alone.attention[0], atol=1e-5)
        np.testing.assert_allclose(together.features.patches[i], alone.features.patches[0], atol=1e-5)
    # the features are the model's: the same as embed's (plain torch here) up to float error
    np.testing.assert_allclose(together.features.cls, embedder.embed(images).cls, atol=1e-4)
