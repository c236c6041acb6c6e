"""The running app sees an index folder change without a restart: a removal or an addition shows in
results within seconds, and a request that started before a change finishes on the state it began with."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import free_port, make_image, write_imagefolder

from dino_demo.engine import Engine
from dino_demo.faces import NoFaceGate
from dino_demo.index import load_index
from dino_demo.index_update import remove_images
from dino_demo.live_index import LiveIndex
from index_builder.__main__ import main as build_main


@pytest.fixture
def folder(tmp_path, tiny_vit) -> Path:
    images = write_imagefolder(tmp_path / "images", 8)
    out = tmp_path / "idx"
    assert build_main(["--dataset", str(images), "--model", str(tiny_vit), "--out", str(out), "--workers", "0",
                       "--no-skip-faces", "--device", "cpu"]) == 0
    return out


def test_a_new_manifest_is_swapped_in_whole_and_the_old_state_stays_usable(folder):
    live = LiveIndex(load_index(folder))
    old = live.index
    assert not live.refresh()  # nothing changed
    remove_images(folder, [2], "test")
    assert live.refresh() and live.index is not old
    assert not live.index.has(2) and old.has(2) and old.row(2)["source_row"] == 2  # the old state still reads


def test_a_state_that_cannot_be_opened_is_skipped_until_the_next_look(folder):
    live = LiveIndex(load_index(folder))
    remove_images(folder, [2], "test")
    segment = folder / live.index.manifest["segments"][0]["dir"]
    moved = folder.parent / "moved"
    shutil.move(segment, moved)  # as if a later change had already cleaned it up
    assert not live.refresh() and live.index.has(2)
    shutil.move(moved, segment)
    assert live.refresh() and not live.index.has(2)


def test_a_request_in_flight_finishes_on_the_state_it_started_with(folder, embedder):
    live = LiveIndex(load_index(folder))
    engine = Engine(embedder, live, NoFaceGate(), 10**8, 10**8)
    query = make_image(2, (50, 120))

    def change_midway(fraction: float, what: str) -> None:
        if what == "Searching":  # after the embedding, before the search: the folder changes now
            remove_images(folder, [2], "test")
            assert live.refresh()

    during = engine.search_image(query, 8, progress=change_midway)
    assert during.items[0].id == 2 and during.items[0].picture is not None  # searched and drawn on one state
    assert 2 not in [item.id for item in engine.search_image(query, 8).items]


def test_the_running_app_serves_removals_and_additions_within_seconds(folder, tiny_vit, tmp_path):
    from gradio_client import Client, handle_file

    from app import open_engine
    from dino_demo.config import Settings
    from dino_demo.ui import build_ui, launch_options

    settings = Settings(model=str(tiny_vit), index=str(folder), device="cpu", port=free_port(), host="127.0.0.1",
                        watch=1, k=8)
    engine = open_engine(settings)
    demo = build_ui(engine, settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings, engine))
    try:
        client = Client(f"http://127.0.0.1:{settings.port}/", verbose=False, download_files=False)
        query = tmp_path / "query.png"
        make_image(2, (50, 120)).save(query)

        def ids(path: Path) -> list[int]:
            _, result = client.predict(handle_file(str(path)), 8, api_name="/search_image")
            return [r["id"] for r in result["results"]]

        assert ids(query)[0] == 2
        assert build_main(["remove", "--index", str(folder), "--ids", "2"]) == 0
        assert wait_for(lambda: 2 not in ids(query)), "the removal did not reach the running app"
        new = tmp_path / "new"
        new.mkdir()
        make_image(77, (64, 64)).save(new / "new77.png")
        assert build_main(["add", "--index", str(folder), "--dataset", str(new), "--workers", "0", "--device", "cpu"]) == 0
        assert wait_for(lambda: ids(new / "new77.png")[0] == 8), "the addition did not reach the running app"
        assert engine.index.count == 8
    finally:
        demo.close()
        engine.live.close()


def wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return False
