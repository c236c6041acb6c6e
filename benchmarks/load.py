"""Load: N concurrent gradio_client clients x M mixed requests against the app running as its own process.

Each client cycles through /search_image, /search_region, /match_patches and a request the app must
refuse (a file that is not an image). Prints, per kind and overall: answered, refused as expected,
"busy" (the queue was full: Gradio's polite "try again"), errors (anything else), p50/p95 round
trip; and the server's resident memory before, at its peak (VmHWM) and after.

    python benchmarks/load.py [--clients 32] [--requests 20] [--queue-size 16] [--device cpu]

The model is a ViT-S/16 with random weights (benchmarks/vits16.py): the real model's compute, offline.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLLECTION = ROOT / "assets" / "collection"
KINDS = ("search_image", "search_region", "match_patches", "refused")
REFUSAL = "not an image"  # the message the junk file must get
BUSY = "Queue is full"  # gradio_client's words for the server's 503 "busy, try again"


@dataclass
class LoadReport:
    """What every request of a load run got, and how long each answered one took (ms)."""

    ok: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    busy: int = 0
    errors: list[str] = field(default_factory=list)
    ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def answered(self) -> int:
        return sum(self.ok.values())


def one_request(client, kind: str, files: list[Path], junk: Path, i: int):
    """Send one request of `kind`; returns normally only if the answer is the expected one."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    pick = lambda j: handle_file(str(files[j % len(files)]))  # noqa: E731
    if kind == "search_image":
        assert len(client.predict(pick(i), 5, api_name="/search_image")[1]["results"]) == 5
    elif kind == "search_region":
        assert client.predict(pick(i), 100, 60, 300, 260, 5, False, api_name="/search_region")[1]["results"]
    elif kind == "match_patches":
        assert client.predict(pick(i), pick(i + 1), None, None, None, None, 20, api_name="/match_patches")[2]["count"]
    else:
        try:
            client.predict(handle_file(str(junk)), 5, api_name="/search_image")
        except AppError as e:
            if REFUSAL not in str(e):
                raise
        else:
            raise AssertionError("a file that is not an image was accepted")


def run_load(url: str, clients: int, requests: int, files: list[Path], junk: Path) -> LoadReport:
    """`clients` threads, each with its own Client, send `requests` mixed requests one after another."""
    from gradio_client import Client

    report, lock = LoadReport(), threading.Lock()
    ready = [Client(url, verbose=False, download_files=False) for _ in range(clients)]
    start = threading.Barrier(clients)

    def work(c: int) -> None:
        start.wait()  # every client starts at once
        for r in range(requests):
            kind = KINDS[(c + r) % len(KINDS)]
            began = time.perf_counter()
            try:
                one_request(ready[c], kind, files, junk, c * requests + r)
            except Exception as e:  # noqa: BLE001  (everything a client can get is counted)
                with lock:
                    if BUSY in str(e):
                        report.busy += 1
                    else:
                        report.errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
                continue
            with lock:
                report.ok[kind] += 1
                report.ms[kind].append((time.perf_counter() - began) * 1000)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report


def memory_mb(pid: int, field_name: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, cache: Path, device: str, queue_size: int, log: Path,
                 root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """`python app.py` of the checkout `root` on a free port (indexing the bundled collection into `cache` first)."""
    port = free_port()
    env = dict(os.environ, DINO_QUEUE_SIZE=str(queue_size), HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(root / "app.py"), "--model", str(model), "--device", device,
                                    "--cache-dir", str(cache), "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=root, env=env, stdout=out, stderr=out)
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the app stopped: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}/"
        time.sleep(0.5)
    raise SystemExit("the app did not start in 10 minutes")


def print_report(report: LoadReport, seconds: float) -> None:
    print(f"{'kind':<16}{'answered':>10}{'p50 ms':>10}{'p95 ms':>10}")
    rows = [(kind, report.ok[kind], report.ms[kind]) for kind in KINDS]
    rows.append(("all", report.answered, [ms for kind in KINDS for ms in report.ms[kind]]))
    for kind, answered, times in rows:
        p50, p95 = np.percentile(times, [50, 95]) if times else (float("nan"),) * 2
        print(f"{kind:<16}{answered:>10}{p50:>10.0f}{p95:>10.0f}")
    print(f"busy (queue full, told to try again): {report.busy}; errors: {len(report.errors)}; "
          f"{report.answered / seconds:.1f} answered requests/s over {seconds:.0f}s")
    for error in report.errors[:10]:
        print("  error:", error)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--queue-size", type=int, default=16, help="the app's DINO_QUEUE_SIZE (default: the app's own, 16)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from vits16 import save_vits16

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        junk = tmp / "notes.jpg"
        junk.write_bytes(b"these are notes, not a photo\n" * 40)
        files = sorted(COLLECTION.glob("*.jpg"))
        server, url = start_server(save_vits16(tmp / "vits16-random"), tmp / "cache", args.device, args.queue_size,
                                   tmp / "app.log")
        try:
            run_load(url, 1, len(KINDS), files, junk)  # warm-up: first-call allocations, MediaPipe graphs
            before = memory_mb(server.pid, "VmRSS")
            print(f"{args.clients} clients x {args.requests} requests, queue size {args.queue_size}, "
                  f"server concurrency 1, {os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.2f}")
            started = time.perf_counter()
            report = run_load(url, args.clients, args.requests, files, junk)
            seconds = time.perf_counter() - started
            print_report(report, seconds)
            after, peak = memory_mb(server.pid, "VmRSS"), memory_mb(server.pid, "VmHWM")
            print(f"server memory: {before:.0f} MB before, peak {peak:.0f} MB, {after:.0f} MB after; "
                  f"load average after {os.getloadavg()[0]:.2f}")
            still = run_load(url, 1, len(KINDS), files, junk)
            print(f"afterwards: {still.answered} of {len(KINDS)} requests answered as expected")
        finally:
            server.terminate()
            server.wait(timeout=60)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
