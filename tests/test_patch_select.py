import numpy as np
import pytest

from dino_demo.errors import UserError
from dino_demo.patch_select import PatchLayout, pooled_cells, reduce_patches, slot_cells, slots_to_grid


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_pooled_slots_cover_every_cell_once_even_on_an_odd_grid():
    cells = pooled_cells((3, 5))
    assert len(cells) == 6 and PatchLayout("pooled").slots((3, 5)) == 6
    assert sorted(np.concatenate(cells).tolist()) == list(range(15))
    assert cells[0].tolist() == [0, 1, 5, 6] and cells[-1].tolist() == [14]


def test_pooling_averages_each_block_and_renormalises():
    rng = np.random.default_rng(0)
    patches = unit(rng.standard_normal((2, 16, 8)))
    pooled, cells = reduce_patches(PatchLayout("pooled"), patches[:, 0], patches, (4, 4))
    assert pooled.shape == (2, 4, 8) and cells is None
    expected = unit(patches[:, [0, 1, 4, 5]].mean(axis=1))
    np.testing.assert_allclose(pooled[:, 0], expected, atol=1e-6)


def test_salient_keeps_the_patches_most_like_cls_in_grid_order():
    rng = np.random.default_rng(1)
    patches = unit(rng.standard_normal((1, 16, 8)))
    cls = unit(patches[0, [3, 9, 12]].sum(axis=0))[None]
    kept, cells = reduce_patches(PatchLayout("salient", 3), cls, patches, (4, 4))
    brute = np.sort(np.argsort(-(patches[0] @ cls[0]))[:3])
    assert cells.tolist() == [brute.tolist()] and cells.dtype == np.int16
    np.testing.assert_array_equal(kept[0], patches[0, brute])
    assert [c.tolist() for c in slot_cells(PatchLayout("salient", 3), (4, 4), cells[0])] == [[c] for c in brute]


def test_slot_values_spread_over_the_cells_they_cover():
    heat = slots_to_grid(np.array([0.9, 0.5]), [np.array([0, 1]), np.array([3])], (2, 2))
    np.testing.assert_allclose(heat, [[0.9, 0.9], [0.5, 0.5]])  # cell 2 is covered by no slot: the lowest value


@pytest.mark.parametrize("text, layout", [("all", PatchLayout()), ("pooled", PatchLayout("pooled")),
                                          ("salient", PatchLayout("salient", 16)), ("salient:4", PatchLayout("salient", 4))])
def test_layouts_parse(text, layout):
    assert PatchLayout.parse(text) == layout


@pytest.mark.parametrize("text", ["some", "salient:0", "pooled:3", "salient:x"])
def test_unknown_layouts_are_refused_with_the_choices(text):
    with pytest.raises(UserError, match="all, pooled, salient"):
        PatchLayout.parse(text)
