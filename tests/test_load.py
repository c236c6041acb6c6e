"""Load through gradio_client: concurrent mixed requests get no errors; beyond the queue bound the
excess is told politely to try again, and the server keeps answering."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

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
    """The real engine, a second slower per search or match, noting when each call runs."""

    def __init__(self, engine: Engine):
        super().__init__(engine.embedder, engine.index, engine.gate, engine.max_pixels, engine.max_bytes, engine.max_k)
        self.runs: list[tuple[float, float]] = []  # (start, end) of each call

    def _slowly(self, method, *args, **kwargs):
        started = time.monotonic()
        time.sleep(1.0)
        try:
            return method(*args, **kwargs)
        finally:
            self.runs.append((started, time.monotonic()))

    def search_image(self, *args, **kwargs):
        return self._slowly(super().search_image, *args, **kwargs)

    def match(self, *args, **kwargs):
        return self._slowly(super().match, *args, **kwargs)


@contextmanager
def slow_server(app_server, **settings):
    """The app over a SlowEngine, with these settings; yields (url, engine)."""
    from dino_demo.config import Settings
    from dino_demo.ui import build_ui, launch_options

    slow = SlowEngine(app_server[1])
    settings = Settings(model=str(slow.embedder.model_id), input_size=224, port=free_port(), host="127.0.0.1",
                        **settings)
    demo = build_ui(slow, settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings, slow))
    try:
        yield f"http://127.0.0.1:{settings.port}/", slow
    finally:
        demo.close()


def all_at_once(calls: list) -> list[str]:
    """Run the calls in threads released together; each outcome is "answered" or the error's message."""
    outcomes, start = [], threading.Barrier(len(calls))

    def run(call) -> None:
        start.wait()
        try:
            call()
            outcomes.append("answered")
        except QueueError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_requests_beyond_the_queue_bound_are_told_to_try_again_and_the_server_carries_on(app_server):
    with slow_server(app_server, queue_size=2, concurrency=1) as (url, _):
        clients = [Client(url, verbose=False, download_files=False) for _ in range(8)]
        outcomes = all_at_once([lambda c=c: c.predict(handle_file(str(FILES[0])), 2, api_name="/search_image")
                                for c in clients])
        busy = [o for o in outcomes if o != "answered"]
        # one runs, two wait: the other five are turned away at once, politely
        assert len(outcomes) == 8 and 1 <= outcomes.count("answered") <= 4 and len(busy) >= 4, outcomes
        assert all(BUSY in o and "Please try again" in o for o in busy)
        _, result = clients[0].predict(handle_file(str(FILES[1])), 2, api_name="/search_image")
        assert len(result["results"]) == 2  # and afterwards it answers again


def test_the_concurrency_limit_holds_across_endpoints(app_server):
    """DINO_CONCURRENCY=1: a search and a match never run at the same time, whichever endpoints they use."""
    with slow_server(app_server, queue_size=8, concurrency=1) as (url, slow):
        clients = [Client(url, verbose=False, download_files=False) for _ in range(4)]
        image, other = handle_file(str(FILES[0])), handle_file(str(FILES[1]))
        outcomes = all_at_once([lambda c=clients[0]: c.predict(image, 2, api_name="/search_image"),
                                lambda c=clients[1]: c.predict(image, other, None, None, None, None, 5,
                                                               api_name="/match_patches"),
                                lambda c=clients[2]: c.predict(other, 2, api_name="/search_image"),
                                lambda c=clients[3]: c.predict(other, image, None, None, None, None, 5,
                                                               api_name="/match_patches")])
        assert outcomes == ["answered"] * 4
        runs = sorted(slow.runs)
        assert len(runs) == 4 and all(end <= next_start for (_, end), (next_start, _) in zip(runs, runs[1:]))
