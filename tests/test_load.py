"""Load through gradio_client: concurrent mixed requests get no errors; beyond the queue bound the
excess is told politely to try again, and the server keeps answering."""
from __future__ import annotations

import sys
import threading
import time

from conftest import ROOT, free_port

sys.path.insert(0, str(ROOT / "benchmarks"))
from load import BUSY, KINDS, run_load  # noqa: E402  (benchmarks/load.py: the same client code)

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

from dino_demo.engine import Engine  # noqa: E402

FILES = sorted((ROOT / "assets" / "collection").glob("*.jpg"))


def test_concurrent_clients_with_mixed_requests_get_no_errors(app_server, tmp_path):
    url, _ = app_server
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"not a photo\n" * 50)
    report = run_load(url, clients=4, requests=6, files=FILES, junk=junk)
    assert report.errors == [] and report.busy == 0  # 4 clients never fill a queue of 16
    assert report.answered == 24 and set(report.ok) == set(KINDS)


class SlowEngine(Engine):
    """The real engine, one second slower per image search: a server kept busy on purpose."""

    def search_image(self, *args, **kwargs):
        time.sleep(1.0)
        return super().search_image(*args, **kwargs)


def test_requests_beyond_the_queue_bound_are_told_to_try_again_and_the_server_carries_on(app_server):
    from dino_demo.config import Settings
    from dino_demo.ui import build_ui, launch_options

    _, engine = app_server
    slow = SlowEngine(engine.embedder, engine.index, engine.gate, engine.max_pixels, engine.max_bytes, engine.max_k)
    settings = Settings(model=str(engine.embedder.model_id), input_size=224, port=free_port(), host="127.0.0.1",
                        queue_size=2, concurrency=1)
    demo = build_ui(slow, settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    try:
        url = f"http://127.0.0.1:{settings.port}/"
        clients = [Client(url, verbose=False, download_files=False) for _ in range(8)]
        outcomes, start = [], threading.Barrier(len(clients))

        def ask(client) -> None:
            start.wait()
            try:
                client.predict(handle_file(str(FILES[0])), 2, api_name="/search_image")
                outcomes.append("answered")
            except QueueError as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = [o for o in outcomes if o != "answered"]
        # one runs, two wait: the other five are turned away at once, politely
        assert len(outcomes) == 8 and 1 <= outcomes.count("answered") <= 4 and len(busy) >= 4, outcomes
        assert all(BUSY in o and "Please try again" in o for o in busy)
        _, result = clients[0].predict(handle_file(str(FILES[1])), 2, api_name="/search_image")
        assert len(result["results"]) == 2  # and afterwards it answers again
    finally:
        demo.close()
