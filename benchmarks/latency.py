"""Latency of each API endpoint through gradio_client, on the default collection, split by step.

/what_dino_sees_video is timed on a 5 s, 640 x 360 clip at 24 frames/s (40 frames analysed at 8 a
second), and its seconds per analysed frame are printed as well.

Uses a ViT-S/16-sized model with random weights (same compute as facebook/dino-vits16 at 224 px),
so it runs offline. The app runs as its own process (`python app.py`, real face gate). Prints p50 /
p95 in ms of: load (decode + face gate), embed, search, draw, total (inside the engine) and round
trip (client to client, with uploads and the queue), and the CPU the app's whole process used per
call (its threads' work on the call and all they did until the next call, the gap included). With
`--baseline REV` the app of commit REV (a git worktree) runs beside it with the same settings, calls
alternate between the two, and the ratio of their round trips is printed: these machines are too
noisy to compare runs made apart. Each call starts `--gap` ms after the one before (0.2 s), so that
an app's leftover work (threads still spinning after a call) falls on no call of the other app and
is counted in its own CPU.
With `--shared-tls` the clients get one TLS context to reuse (`Client(url, ssl_verify=ssl_context)`):
by default gradio_client builds a new one for each request it sends, ≈ 20 ms of CPU each, three per
call, even over plain http://. The clients leave the result pictures on the server
(`download_files=False`) unless `--download` is given: then, as gradio_client does by default, they
fetch every picture of every answer, each request with its own TLS context unless `--shared-tls`.

With `--think MS` the client is plain HTTP instead (one kept-alive connection, the README's httpx way)
and waits MS between sending its files and making its call, using no CPU: a client on another machine,
as every user of a hosted Space is, whose own work (or a person choosing a button) takes that long.
Its round trips are printed without the wait. This is where an upload prepared early (dino_demo/uploads.py)
shows; a client on the app's own two cores instead takes those cores while the app prepares.

With `--photo-width PX` the photos sent are the shipped ones enlarged to PX on their longer side, with
grain: a phone's JPEGs (4032: up to 12 megapixels, ≈ 3 MB each), instead of the shipped 512 px ones.

    python benchmarks/latency.py [--runs 20] [--clip-runs 5] [--device cpu] [--baseline 4f124cb] [--shared-tls]
                                 [--download]
                                 [--think MS] [--gap MS] [--photo-width PX] [--endpoints /search_image,...]
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vits16 import save_vits16  # noqa: E402  (benchmarks/ is on the path when run as a script)
COLLECTION = ROOT / "assets" / "collection"
STEPS = ("load", "decode", "face_gate", "embed", "model", "search", "colours", "draw", "encode", "total", "round_trip")
ENDPOINTS = ("/search_image", "/search_region", "/match_patches", "/co_segment", "/what_dino_sees",
             "/what_dino_sees_video")
CLIP = dict(seconds=5, fps=24, size=(640, 360))


def write_clip(path: Path) -> Path:
    """A clip panning across a bundled photo, as a phone clip would move over a scene."""
    from PIL import Image

    from dino_demo.frames import write_video

    photo = Image.open(COLLECTION / "mate-red-marigold.jpg").convert("RGB")
    photo = photo.resize((photo.width * 2, photo.height * 2), Image.Resampling.BICUBIC)
    (w, h), count = CLIP["size"], CLIP["seconds"] * CLIP["fps"]
    frames = [photo.crop((x := round((photo.width - w) * i / (count - 1)), 0, x + w, h)) for i in range(count)]
    return write_video(frames, CLIP["fps"], path)



@contextmanager
def running_apps(tmp: Path, device: str, baseline: str | None) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    """This checkout's app and, with a baseline, the app of that commit (a git worktree), each `python app.py`
    with the ViT-S/16-sized model: (name -> URL, name -> process id); stopped, and the worktree removed, on leaving."""
    from load import start_server

    roots, urls, processes = {"new": ROOT}, {}, {}
    model = save_vits16(tmp / "vit-small-patch16-random")
    try:
        if baseline:
            roots["old"] = tmp / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(roots["old"]), baseline],
                           check=True, capture_output=True)
        for name, root in roots.items():
            started = time.perf_counter()
            processes[name], urls[name] = start_server(model, tmp / f"cache-{name}", device, 16, tmp / f"{name}.log",
                                                       root=root)
            print(f"{name} app ({root}) ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        yield urls, {name: process.pid for name, process in processes.items()}
    finally:
        for process in processes.values():  # the apps stop with the benchmark, even one cut short
            process.terminate()
            process.wait(timeout=30)
        if baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(roots["old"])])


def phone_photos(side: int, folder: Path) -> list[Path]:
    """The collection's photos as a phone would send them: `side` px on their longer side, JPEG, with grain."""
    from large_photo import phone_photo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, photo in enumerate(sorted(COLLECTION.glob("*.jpg"))):
        paths.append(folder / photo.name)
        paths[-1].write_bytes(phone_photo(side, seed=i, source=photo))
    return paths


def calls(client, handle_file, clip: Path, photos: list[Path] | None = None) -> dict:
    """One call per endpoint, cycling through the collection (or `photos`) so no two calls in a row are the same."""
    files = photos or sorted(COLLECTION.glob("*.jpg"))
    pick = lambda i: handle_file(str(files[i % len(files)]))  # noqa: E731
    return {
        "/co_segment": lambda i: client.predict(pick(i), pick(i + 1), api_name="/co_segment")[1],
        "/what_dino_sees": lambda i: client.predict(pick(i), 60, api_name="/what_dino_sees")[3],
        "/what_dino_sees_video": lambda i: client.predict(handle_file(str(clip)), 60,
                                                          api_name="/what_dino_sees_video")[1],
        "/search_image": lambda i: client.predict(pick(i), 8, api_name="/search_image")[1],
        "/search_region": lambda i: client.predict(pick(i), 100, 60, 300, 260, 8, False, api_name="/search_region")[1],
        "/match_patches": lambda i: client.predict(pick(i), pick(i + 1), None, None, None, None, 50,
                                                   api_name="/match_patches")[2],
    }


class ThinkingClient:
    """Plain HTTP through one connection, in gradio_client's shape (`predict`, `view_api`): sends the files
    among the arguments, waits `think` seconds, then calls and reads the answer's event stream; `waited`
    adds up the waits, for the round trips to leave out."""

    def __init__(self, url: str, think: float):
        import httpx

        self.http, self.think, self.waited = httpx.Client(base_url=url, timeout=300), think, 0.0

    def predict(self, *args, api_name: str):
        data = [self._sent(a) if isinstance(a, dict) and "path" in a else a for a in args]
        time.sleep(self.think)
        self.waited += self.think
        event = self.http.post(f"gradio_api/call{api_name}", json={"data": data}).json()["event_id"]
        answer = self.http.get(f"gradio_api/call{api_name}/{event}").text
        kind, _, payload = answer.partition("\ndata: ")
        if kind != "event: complete":
            raise RuntimeError(f"{api_name}: {answer[:300]}")
        return tuple(json.loads(payload))

    def _sent(self, file: dict) -> dict:
        with open(file["path"], "rb") as f:
            path = self.http.post("gradio_api/upload", files={"files": (Path(file["path"]).name, f)}).json()[0]
        return {"path": path, "meta": {"_type": "gradio.FileData"}}

    def view_api(self, **_) -> dict:
        return self.http.get("gradio_api/info").json()


def client_kind(args) -> str:
    if args.think is not None:
        return f"plain HTTP on one connection, {args.think:.0f} ms between the files and the call (left out)"
    return ("gradio_client with " + ("one TLS context it reuses" if args.shared_tls else
                                     "a new TLS context for each request (its default)")
            + (", downloading every result picture (its default)" if args.download else ", pictures left on the server"))


def served(client) -> set[str]:
    """The endpoints an app offers (a baseline may predate some)."""
    return set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU seconds used so far by process `pid` (Linux), 0 where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(calls_by_app: dict, clients: dict, runs: int, gap: float = 0.0,
            pids: dict | None = None) -> dict[str, dict[str, list[float]]]:
    """Per app, each step's times; the apps' calls alternate so that noise falls on both alike, each `gap`
    seconds after the one before. With the apps' `pids`, "server_cpu" holds each one's mean CPU ms per
    call: from the call's start to the next call's, so the gap after it (its aftermath) is counted."""
    times = {name: {step: [] for step in (*STEPS, "per_frame", "server_cpu")} for name in calls_by_app}
    for call in calls_by_app.values():
        call(0)  # warm-up: first-call allocations, MediaPipe graph loading
    pids, cpu = pids or {}, {name: 0.0 for name in calls_by_app}
    time.sleep(gap)
    for i in range(1, runs + 1):
        for name, call in calls_by_app.items():
            cpu_before = cpu_seconds(pids.get(name))
            started, waited = time.perf_counter(), getattr(clients[name], "waited", 0.0)
            result = call(i)
            waited = getattr(clients[name], "waited", 0.0) - waited
            times[name]["round_trip"].append((time.perf_counter() - started - waited) * 1000)
            time.sleep(gap)
            cpu[name] += cpu_seconds(pids.get(name)) - cpu_before
            for step, ms in result["timings_ms"].items():
                times[name][step].append(ms)
            if "seconds_per_frame" in result:
                times[name]["per_frame"].append(result["seconds_per_frame"] * 1000)
    for name in pids.keys() & calls_by_app.keys():
        times[name]["server_cpu"].append(cpu[name] * 1000 / runs)
    return times


def report(clients: dict, clip: Path, args, pids: dict | None = None, photos: list[Path] | None = None) -> None:
    """Measures every endpoint on each app that serves it and prints the table."""
    import torch
    from gradio_client import handle_file

    print(f"{args.runs} calls per endpoint and app, torch {torch.__version__} on {args.device}, "
          f"{torch.get_num_threads()} threads, "
          f"{client_kind(args)}, calls {args.gap:.0f} ms apart, "
          + (f"photos {args.photo_width} px on their longer side (JPEG {np.median([p.stat().st_size for p in photos]) / 1e6:.1f} MB); "
             if photos else "the shipped photos; ")
          + "ms as p50 / p95")
    print(f"{'endpoint':<16}{'app':<5}" + "".join(f"{step:>16}" for step in STEPS))
    for endpoint in args.endpoints.split(","):
        apps = {name: client for name, client in clients.items() if endpoint in served(client)}
        runs = args.clip_runs if endpoint.endswith("video") else args.runs
        times = measure({name: calls(client, handle_file, clip, photos)[endpoint] for name, client in apps.items()},
                        apps, runs, args.gap / 1000, pids)
        for name, steps in times.items():
            cells = [f"{np.percentile(v, 50):7.1f} /{np.percentile(v, 95):7.1f}" if v else f"{'-':>15}"
                     for v in (steps[s] for s in STEPS)]
            print(f"{endpoint:<16}{name:<5}" + "".join(f"{c:>16}" for c in cells))
            if steps["server_cpu"]:
                print(f"{endpoint:<16}{name:<5}server CPU per call: {steps['server_cpu'][0]:.0f} ms")
            if steps["per_frame"]:
                print(f"{endpoint:<16}{name:<5}ms per analysed frame p50 / p95: "
                      f"{np.percentile(steps['per_frame'], 50):.1f} / {np.percentile(steps['per_frame'], 95):.1f}")
        if "old" in times:
            new, old = (np.percentile(times[n]["round_trip"], 50) for n in ("new", "old"))
            print(f"{endpoint:<16}round trip p50 new / old = {new / old:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--clip-runs", type=int, default=5, help="calls of /what_dino_sees_video (each several seconds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline", metavar="REV", help="also run the app of this commit, side by side")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS), help="comma-separated, of: " + ", ".join(ENDPOINTS))
    p.add_argument("--gap", type=float, default=200, metavar="MS", help="pause after each call (0.2 s)")
    p.add_argument("--shared-tls", action="store_true", help="give each client one TLS context to reuse")
    p.add_argument("--download", action="store_true", help="fetch every result picture, as gradio_client does by default")
    p.add_argument("--think", type=float, metavar="MS",
                   help="plain HTTP instead, waiting MS between the files and the call (a client elsewhere)")
    p.add_argument("--photo-width", type=int, metavar="PX",
                   help="send the shipped photos enlarged to PX on their longer side, with grain: a phone's JPEGs (4032)")
    args = p.parse_args()
    if args.think is not None and (args.download or args.shared_tls):
        p.error("--think is a plain-HTTP client: --download and --shared-tls are gradio_client's")
    if unknown := set(args.endpoints.split(",")) - set(ENDPOINTS):
        p.error(f"unknown endpoints: {', '.join(sorted(unknown))}")
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp, running_apps(Path(tmp), args.device, args.baseline) as (urls, pids):
        tls = {"ssl_verify": ssl.create_default_context()} if args.shared_tls else {}
        clients = {name: ThinkingClient(url, args.think / 1000) if args.think is not None else
                   Client(url, verbose=False, download_files=str(Path(tmp) / f"downloads-{name}") if args.download
                          else False, **tls) for name, url in urls.items()}
        photos = phone_photos(args.photo_width, Path(tmp) / "phone") if args.photo_width else None
        report(clients, write_clip(Path(tmp) / "clip.mp4"), args, pids, photos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
