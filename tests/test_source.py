import time

import pytest

from dino_demo.errors import HubUnreachable
from index_builder.source import SourceError, open_source


def test_imagefolder_rows_come_undecoded_with_labels_in_order(image_folder):
    source = open_source(str(image_folder))
    assert (source.num_rows, source.image_column, source.label_column) == (12, "image", "label")
    rows = list(source.rows(start=10))
    assert [r.index for r in rows] == [10, 11]
    assert set(rows[0].image) == {"bytes", "path"} and rows[0].label == "picture 10"


def test_streaming_rows_resume_from_a_position(image_folder):
    source = open_source(str(image_folder), streaming=True)
    assert source.num_rows is None
    rows = list(source.rows(start=4, limit=7))
    assert [r.index for r in rows] == [4, 5, 6] and rows[0].label == "picture 4"


def test_a_missing_column_names_the_columns_there(image_folder):
    with pytest.raises(SourceError, match=r"no column 'photo'.*\['image', 'label'\]"):
        open_source(str(image_folder), image_column="photo")
    with pytest.raises(SourceError, match="no column 'caption'"):
        open_source(str(image_folder), label_column="caption")


def test_a_missing_split_says_to_pass_split(image_folder):
    with pytest.raises(SourceError, match="--split"):
        open_source(str(image_folder), split="validation")


def test_something_that_is_neither_path_nor_hub_id_is_refused(tmp_path):
    with pytest.raises(SourceError, match="neither a local folder"):
        open_source(str(tmp_path / "no" / "such" / "folder"))


def test_an_uncached_hub_dataset_offline_is_one_clear_error():
    started = time.perf_counter()
    with pytest.raises(HubUnreachable) as caught:
        open_source("some-org/some-images")
    message = str(caught.value)
    assert "some-org/some-images" in message and "--dataset" in message and "\n" not in message
    assert time.perf_counter() - started < 30
