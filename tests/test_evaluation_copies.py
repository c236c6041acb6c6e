import numpy as np
from PIL import ImageOps

from conftest import make_image
from dino_demo.copies import TRANSFORMS, make_copies


def test_every_transform_makes_a_changed_rgb_copy_except_exact():
    original = make_image(5, (160, 120))
    copies = make_copies(original, seed=1)
    assert [c.transform for c in copies] == list(TRANSFORMS)
    for copy in copies:
        assert copy.image.mode == "RGB"
        same = copy.image.size == original.size and np.array_equal(np.asarray(copy.image), np.asarray(original))
        assert same == (copy.transform == "exact"), copy.transform


def test_copies_are_reproducible_from_the_seed():
    original = make_image(6, (120, 90))
    a, b = make_copies(original, seed=3), make_copies(original, seed=3)
    c = make_copies(original, seed=4, names=["crop"])[0]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert c.image.size != a[1].image.size or not np.array_equal(np.asarray(c.image), np.asarray(a[1].image))


def test_geometric_transforms_do_what_they_say():
    original = make_image(7, (160, 120))
    by_name = {c.transform: c.image for c in make_copies(original, seed=0)}
    assert np.array_equal(np.asarray(by_name["flip"]), np.asarray(ImageOps.mirror(original)))
    w, h = by_name["crop"].size
    assert w < 160 and h < 120
    assert by_name["scale"].size[0] < 160 * 0.61
    assert by_name["rotation"].size == original.size
