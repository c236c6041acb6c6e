"""Pictures: boxes land where they should on thumbnails, match lines join the matched points, heat maps fit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dino_demo.draw import BOX_COLOUR, draw_box, draw_heatmap, draw_matches, match_colours
from dino_demo.matching import Matches

GREY = (128, 128, 128)


def is_colour(pixel, colour, tolerance=40) -> bool:
    return all(abs(int(p) - int(c)) <= tolerance for p, c in zip(pixel, colour))


def test_box_in_original_pixels_lands_at_the_right_thumbnail_pixels():
    thumb = Image.new("RGB", (200, 100), GREY)  # a 400 x 200 original shrunk by half
    drawn = np.asarray(draw_box(thumb, (100, 50, 300, 150), original_size=(400, 200), width=3))
    assert drawn.shape == (100, 200, 3)
    # The outline runs just inside (50, 25)-(150, 75) on the thumbnail.
    for x, y in [(51, 50), (148, 50), (100, 26), (100, 73)]:
        assert is_colour(drawn[y, x], BOX_COLOUR), (x, y, drawn[y, x])
    for x, y in [(100, 50), (20, 50), (180, 50), (100, 10), (100, 90)]:  # centre and outside stay grey
        assert is_colour(drawn[y, x], GREY, 10), (x, y, drawn[y, x])


def test_box_without_original_size_is_in_the_image_pixels():
    drawn = np.asarray(draw_box(Image.new("RGB", (100, 100), GREY), (10, 10, 90, 90), width=2))
    assert is_colour(drawn[50, 10], BOX_COLOUR) and is_colour(drawn[50, 50], GREY, 10)


def test_box_leaves_the_photo_as_it_was_away_from_the_outline_and_softens_its_edges():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    before = np.asarray(photo).copy()
    drawn = np.asarray(draw_box(photo, (20.5, 30.25, 140.5, 100.75), width=3)).astype(int)
    assert (np.asarray(photo) == before).all()  # the input is not drawn on
    rows, cols = np.mgrid[:120, :160]
    near = ((cols >= 18) & (cols <= 143) & (rows >= 28) & (rows <= 103)) & \
        ~((cols >= 25) & (cols <= 135) & (rows >= 35) & (rows <= 95))  # the ring the outline may touch
    assert (drawn[~near] == before[~near]).all()  # every other pixel is the photo's own
    assert is_colour(drawn[65, 22], BOX_COLOUR, 5)  # fully covered: the pure colour
    # A half-covered pixel at the rim's outer edge mixes the dark rim with the photo.
    half = drawn[65, 19]
    assert not is_colour(half, (20, 20, 20), 5) and not (half == before[65, 19]).all()


@pytest.mark.parametrize("box", [(-7.5, 12.25, 60.5, 140.0), (30.0, -3.0, 200.0, 50.5), (-20, -20, 180, 140),
                                 (150.2, 110.6, 170.0, 130.0), (40, 40, 41, 42)])
def test_a_box_hanging_off_the_picture_or_smaller_than_its_outline_is_drawn_as_over_the_whole_picture(box):
    """The outline is computed in its own rectangle, clipped to the picture: the same pixels as blending
    the exact coverage of the whole picture."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))

    def coverage(rect):  # each pixel's share inside rect, over the whole picture
        share = lambda n, lo, hi: np.clip(np.minimum(np.arange(n) + 1, hi) - np.maximum(np.arange(n), lo), 0, 1)  # noqa: E731
        return np.outer(share(120, rect[1], rect[3]), share(160, rect[0], rect[2]))

    expected, (x0, y0, x1, y1) = photo.copy(), box
    for grow, shrink, paint in ((1, 4, (20, 20, 20)), (0, 3, BOX_COLOUR)):
        ring = coverage((x0 - grow, y0 - grow, x1 + grow, y1 + grow)) - \
            coverage((x0 + shrink, y0 + shrink, x1 - shrink, y1 - shrink))
        expected.paste(paint, mask=Image.fromarray((ring * 255).round().astype(np.uint8)))
    assert (np.asarray(draw_box(photo, box, width=3)) == np.asarray(expected)).all()


def test_heatmap_has_the_image_size_and_is_brightest_where_similarity_is_highest():
    image = Image.new("RGB", (120, 80), GREY)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 3] = 1.0  # top-right patch
    out = draw_heatmap(image, heat)
    assert out.size == image.size and out.mode == "RGB"
    pixels = np.asarray(out, dtype=int)
    brightness = pixels.sum(axis=2)
    assert brightness[10, 105] > brightness[70, 15] + 100  # hot top-right, cold bottom-left


def test_heatmap_of_a_flat_map_does_not_fail():
    assert draw_heatmap(Image.new("RGB", (30, 20), GREY), np.full((2, 2), 0.5)).size == (30, 20)


def one_match(point_a, point_b, box=None) -> Matches:
    return Matches(np.array([0]), np.array([0]), np.array([0.9]), np.array([point_a], np.float32),
                   np.array([point_b], np.float32), box)


def test_match_line_joins_the_two_points_side_by_side_at_the_same_height():
    a, b = Image.new("RGB", (200, 100), (0, 0, 0)), Image.new("RGB", (100, 50), (0, 0, 0))
    # A's point (20, 50); B's point (50, 25) in B's pixels is (50*2 + 200 + gap, 50) once B is scaled to 100 px high.
    picture = draw_matches(a, b, one_match((20, 50), (50, 25)), n=10, height=100, gap=10)
    assert picture.size == (200 + 10 + 200, 100)
    pixels = np.asarray(picture)
    colour = match_colours(1)[0]
    for x in (60, 150, 205, 250):  # along the horizontal line y = 50, both images and the gap
        assert is_colour(pixels[50, x], colour, 60), (x, pixels[50, x])
    assert is_colour(pixels[20, 150], (0, 0, 0), 10)  # away from the line stays black


def test_match_lines_are_coloured_strongest_to_weakest_and_limited_to_n():
    a = b = Image.new("RGB", (100, 100), (0, 0, 0))
    matches = Matches(np.arange(3), np.arange(3), np.array([0.9, 0.8, 0.7]),
                      np.array([[10, 10], [10, 50], [10, 90]], np.float32),
                      np.array([[90, 10], [90, 50], [90, 90]], np.float32), None)
    pixels = np.asarray(draw_matches(a, b, matches, n=2, height=100, gap=0))
    assert is_colour(pixels[10, 100], match_colours(2)[0], 60)
    assert is_colour(pixels[50, 100], match_colours(2)[1], 60)
    assert is_colour(pixels[90, 100], (0, 0, 0), 10)  # the third match is not drawn
    assert match_colours(2)[0] != match_colours(2)[1]


def test_match_picture_outlines_the_box_on_a():
    a = b = Image.new("RGB", (100, 100), (0, 0, 0))
    pixels = np.asarray(draw_matches(a, b, one_match((50, 50), (50, 50), box=(20, 20, 80, 80)), n=0, height=100))
    assert is_colour(pixels[50, 21], BOX_COLOUR) and is_colour(pixels[50, 50], (0, 0, 0), 10)


@pytest.mark.parametrize("size", [(64, 64), (50, 120)])
def test_match_picture_keeps_aspect_ratios(size):
    a, b = Image.new("RGB", size, GREY), Image.new("RGB", (100, 50), GREY)
    picture = draw_matches(a, b, one_match((1, 1), (1, 1)), height=60, gap=0)
    assert picture.size == (round(size[0] * 60 / size[1]) + 120, 60)


def test_phone_photos_in_a_match_picture_look_as_if_resampled_whole():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((4032, 3024), Image.Resampling.BICUBIC)  # smooth, like a photo
    picture = np.asarray(draw_matches(photo, photo, one_match((0, 0), (0, 0)), n=0, height=300, gap=0), np.int16)
    whole = np.asarray(photo.resize((400, 300), Image.Resampling.LANCZOS), np.int16)
    assert picture.shape == (300, 800, 3)
    assert np.abs(picture[:, :400] - whole).mean() < 1 and np.abs(picture[:, 400:] - whole).mean() < 1
