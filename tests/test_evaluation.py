"""`python -m evaluation` on tiny models: the synthetic copy-detection suite, and each
protocol's figures against a brute-force ranking computed here."""
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_image
from dino_demo.images import load_image
from dino_demo.index import load_index
from dino_demo.search import MAX_RESULTS, search_region
from evaluation.__main__ import main
from dino_demo.copies import TRANSFORMS, make_copies
from evaluation.metrics import RevisitedTruth, revisited_map, summarise
from evaluation.sets import load_copies
from index_builder.build import BuildOptions, build_index
from index_builder.eval import NOTE
from index_builder.source import open_source


def build(folder: Path, embedder, out: Path, index_type: str = "flat"):
    options = BuildOptions(workers=0, skip_faces=False, index_type=index_type)
    build_index(open_source(str(folder)), embedder, str(out), options)
    return load_index(out, embedder.describe())


def run_eval(tmp_path, *args) -> dict:
    out = tmp_path / "figures.json"
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def figures(report: dict, search: str, index: str | None = None) -> dict:
    return next(r["metrics"] for r in report["results"] if r["search"] == search and (index is None or r["index"] == index))


def brute_force_rows(index, embedder, image) -> list[int]:
    """Source rows of all indexed images, most similar CLS first, by numpy."""
    stored = index.vectors()
    order = np.argsort(-(stored @ embedder.embed([image]).cls[0]), kind="stable")
    return index.meta.column("source_row").to_numpy()[order].tolist()


@pytest.fixture(scope="module")
def copy_suite(tmp_path_factory, embedder):
    """70 generated photos (the first ones are the originals, the rest distractors), indexed
    exactly and compressed (enough patches for an IVF-PQ patch index; the global one stays exact)."""
    folder = tmp_path_factory.mktemp("copies") / "images"
    folder.mkdir()
    for i in range(70):
        make_image(i, ((160, 120), (120, 160), (140, 140))[i % 3]).save(folder / f"img{i:03d}.png")
    root = folder.parent
    return folder, build(folder, embedder, root / "exact"), build(folder, embedder, root / "compressed", "compressed")


def test_synthetic_copy_suite_finds_every_original_at_rank_one_from_its_exact_copy(copy_suite, tmp_path, capsys):
    folder, exact, compressed = copy_suite
    report = run_eval(tmp_path, "--index", str(exact.path), str(compressed.path), "--queries", str(folder),
                      "--protocol", "copies", "--synthetic", "8")
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["index", "factories", "search", "set", "queries", "mAP", "P@1"]
    exact_rows = [line.split() for line in table if " exact " in line]
    assert len(table) == 1 + 2 * 2 * (1 + len(TRANSFORMS)) and len(exact_rows) == 4
    assert all(row[-2:] == ["100.0", "100.0"] for row in exact_rows)
    assert report["query_count"] == 8 * len(TRANSFORMS)
    assert len(report["results"]) == 4  # exact and compressed x image and region search
    for result in report["results"]:
        metrics = result["metrics"]
        assert set(metrics) == {"all", *TRANSFORMS}
        assert metrics["exact"]["map"] == pytest.approx(1.0) and metrics["exact"]["queries"] == 8
        assert metrics["exact"]["precision"]["1"] == pytest.approx(1.0)
        assert all(0.0 <= m["map"] <= 1.0 and m["queries"] == 8 for name, m in metrics.items() if name != "all")
    factories = {r["index"]: r["factories"]["patch"] for r in report["results"]}
    assert factories[str(exact.path)] == "Flat" and factories[str(compressed.path)].startswith("IVF")


def test_copy_detection_map_matches_brute_force(copy_suite, tmp_path, embedder):
    folder, index, _ = copy_suite
    report = run_eval(tmp_path, "--index", str(index.path), "--queries", str(folder), "--protocol", "copies",
                      "--synthetic", "3", "--transforms", "crop,jpeg", "--searches", "image", "--seed", "9")
    eval_set = load_copies(str(folder), "train", set(range(70)), 3, ["crop", "jpeg"], 9)
    rankings = [brute_force_rows(index, embedder, image) for image in eval_set.images()]
    expected = summarise(rankings, [{q.truth} for q in eval_set.queries])
    assert [q.truth for q in eval_set.queries] == [0, 0, 1, 1, 2, 2]
    assert figures(report, "image")["all"]["map"] == pytest.approx(expected.map, abs=1e-6)


def test_copies_made_elsewhere_are_scored_against_their_original(copy_suite, tmp_path, embedder):
    folder, index, _ = copy_suite
    copies = tmp_path / "copies"
    copies.mkdir()
    made = [(5, "exact"), (9, "jpeg"), (12, "crop"), (20, "exact")]
    lines = []
    for n, (row, transform) in enumerate(made):
        make_copies(load_image(folder / f"img{row:03d}.png"), n, [transform])[0].image.save(copies / f"c{n}.png")
        lines.append(json.dumps({"file_name": f"c{n}.png", "original": row, "kind": transform}))
    (copies / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    report = run_eval(tmp_path, "--index", str(index.path), "--queries", str(copies), "--protocol", "copies",
                      "--original-column", "original", "--group-column", "kind", "--searches", "image")
    got = figures(report, "image")
    assert set(got) == {"all", "exact", "jpeg", "crop"} and got["exact"]["queries"] == 2
    assert got["exact"]["map"] == pytest.approx(1.0)
    rankings = [brute_force_rows(index, embedder, load_image(copies / f"c{n}.png")) for n in range(4)]
    expected = summarise(rankings, [{row} for row, _ in made])
    assert got["all"]["map"] == pytest.approx(expected.map, abs=1e-6)


def test_labels_leave_one_out_matches_brute_force(tmp_path, embedder):
    folder = tmp_path / "labelled"
    folder.mkdir()
    lines = ["file_name,label"]
    for i in range(15):
        make_image(i, (96, 72)).save(folder / f"img{i:02d}.png")
        lines.append(f"img{i:02d}.png,class {i % 4}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    index = build(folder, embedder, tmp_path / "idx")
    report = run_eval(tmp_path, "--index", str(index.path), "--queries", str(folder), "--protocol", "labels",
                      "--leave-one-out")
    labels = [f"class {i % 4}" for i in range(15)]
    rankings, positives = [], []
    for row in range(15):
        ranking = brute_force_rows(index, embedder, load_image(folder / f"img{row:02d}.png"))
        rankings.append([r for r in ranking if r != row])
        positives.append({r for r in range(15) if labels[r] == labels[row] and r != row})
    expected = summarise(rankings, positives, ks=(1, 5, 10))
    got = figures(report, "image")["all"]
    assert got["queries"] == 15
    assert got["map"] == pytest.approx(expected.map, abs=1e-6)
    assert [got["precision"][str(k)] for k in (1, 5, 10)] == pytest.approx([expected.precision[k] for k in (1, 5, 10)])
    assert 0 <= figures(report, "region")["all"]["map"] <= 1


@pytest.fixture
def revisited(tmp_path, embedder):
    """A ground truth in gnd_roxford5k.pkl's format: 20 database images listed in shuffled order,
    4 query images that sit in jpg/ too (as in the real data) but not in imlist."""
    rng = np.random.default_rng(0)
    jpg = tmp_path / "rtest" / "jpg"
    jpg.mkdir(parents=True)
    db = [f"db_{i:02d}" for i in range(20)]
    for i, name in enumerate(db):
        make_image(200 + i, (96, 72)).save(jpg / f"{name}.jpg", quality=95)
    queries = [f"q_{j}" for j in range(4)]
    for j, name in enumerate(queries):
        make_image(200 + 3 * j, (96, 72)).save(jpg / f"{name}.jpg", quality=80)  # a copy of db image 3j
    imlist = [db[i] for i in rng.permutation(20)]
    gnd = []
    for j in range(4):
        items = rng.permutation(20).tolist()
        gnd.append({"bbx": [0.0, 0.0, 40.0, 30.0], "easy": items[:3], "hard": items[3:5], "junk": items[5:7]})
    gnd[3]["hard"] = []  # a query with no hard positive is left out of Hard, as revisitop does
    with open(tmp_path / "rtest" / "gnd_rtest.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": queries, "gnd": gnd}, f)
    index = build(jpg, embedder, tmp_path / "ridx")
    return tmp_path / "rtest", index, imlist, queries, gnd


def test_revisited_protocol_matches_brute_force_with_the_query_box(revisited, tmp_path, embedder):
    root, index, imlist, queries, gnd = revisited
    report = run_eval(tmp_path, "--index", str(index.path), "--queries", str(root))  # protocol found from gnd_*.pkl
    assert report["protocol"] == "revisited" and report["query_count"] == 4
    position = {name: i for i, name in enumerate(imlist)}
    name_of_row = {row.index: Path(row.image["path"]).stem for row in open_source(str(root / "jpg")).rows()}
    truths = [RevisitedTruth(g["easy"], g["hard"], g["junk"]) for g in gnd]

    def as_items(rows):  # the query images are indexed too but are not in the protocol's database
        return [position[name_of_row[r]] for r in rows if name_of_row[r] in position]

    images = [load_image(root / "jpg" / f"{q}.jpg") for q in queries]
    by_image = [as_items(brute_force_rows(index, embedder, im)) for im in images]
    by_region = []
    for image in images:
        hits = search_region(index, embedder.embed([image]), (0, 0, 40, 30), k=1000)
        by_region.append(as_items([index.row(h.id)["source_row"] for h in hits]))
    for search, rankings in (("image", by_image), ("region", by_region)):
        expected, got = revisited_map(rankings, truths), figures(report, search)
        assert got["medium"]["map"] == pytest.approx(expected["medium"].map, abs=1e-6)
        assert got["hard"]["map"] == pytest.approx(expected["hard"].map, abs=1e-6)
        assert got["medium"]["queries"] == 4 and got["hard"]["queries"] == 3
        assert got["hard"]["aps"][3] is None  # no hard positive: left out, not scored 0
        assert got["hard"]["aps"][:3] == pytest.approx(expected["hard"].aps[:3])
    assert report["notes"][0].startswith("20 images of the ground truth's database found")


def test_revisited_ground_truth_from_a_collection_indexes_rows(tmp_path, embedder):
    """A datasets collection of queries with bbx/easy/hard/junk columns, indices being source rows."""
    db, queries = tmp_path / "db", tmp_path / "queries"
    db.mkdir(), queries.mkdir()
    for i in range(12):
        make_image(300 + i, (96, 72)).save(db / f"img{i:02d}.png")
    truths, lines = [], []
    for j in range(3):
        make_image(300 + 4 * j, (96, 72)).save(queries / f"q{j}.jpg", quality=70)
        truth = RevisitedTruth(easy=[4 * j, (4 * j + 5) % 12], hard=[(4 * j + 7) % 12], junk=[(4 * j + 1) % 12])
        truths.append(truth)
        lines.append(json.dumps({"file_name": f"q{j}.jpg", "bbx": [10, 10, 80, 60], "easy": truth.easy,
                                 "hard": truth.hard, "junk": truth.junk}))
    (queries / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    index = build(db, embedder, tmp_path / "idx")
    report = run_eval(tmp_path, "--index", str(index.path), "--queries", str(queries), "--protocol", "revisited",
                      "--searches", "image")
    rankings = [brute_force_rows(index, embedder, load_image(queries / f"q{j}.jpg")) for j in range(3)]
    expected = revisited_map(rankings, truths)
    got = figures(report, "image")
    assert got["medium"]["map"] == pytest.approx(expected["medium"].map, abs=1e-6)
    assert got["hard"]["map"] == pytest.approx(expected["hard"].map, abs=1e-6)


def test_revisited_without_ground_truth_says_what_to_give(tmp_path, embedder, capsys, copy_suite):
    folder, index, _ = copy_suite
    code = main(["--index", str(index.path), "--queries", str(folder), "--protocol", "revisited",
                 "--out", str(tmp_path / "x.json"), "--device", "cpu"])
    assert code == 2
    assert "gnd_roxford5k.pkl" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("depth", ["0", str(MAX_RESULTS + 1)])
def test_depth_beyond_what_one_search_returns_is_refused_in_one_line(copy_suite, tmp_path, capsys, depth):
    _, index, _ = copy_suite
    out = tmp_path / "x.json"
    code = main(["--index", str(index.path), "--queries", "nowhere", "--depth", depth, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: --depth must be between 1 and {MAX_RESULTS}, the most results one search returns (got {depth})."]
    assert not out.exists()


def test_old_command_prints_a_note_and_gives_the_same_figures(copy_suite, tmp_path):
    """`python -m index_builder.eval` still runs the job, as `python -m evaluation` does, with a note on stderr."""
    folder, index, _ = copy_suite
    args = ["--index", str(index.path), "--queries", str(folder), "--protocol", "copies", "--synthetic", "2",
            "--transforms", "exact,jpeg", "--searches", "image", "--device", "cpu"]
    modules = ("evaluation", "index_builder.eval")
    started = [subprocess.Popen([sys.executable, "-m", module, *args, "--out", str(tmp_path / f"{module}.json")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for module in modules]  # side by side: each spends seconds importing
    (new_out, new_err), (old_out, old_err) = [process.communicate(timeout=300) for process in started]
    assert [process.returncode for process in started] == [0, 0], new_err + old_err
    new_figures, old_figures = (json.loads((tmp_path / f"{module}.json").read_text()) for module in modules)
    assert old_err.splitlines()[0] == NOTE and NOTE not in new_err
    assert old_out == new_out and "exact" in new_out
    assert old_figures == new_figures


def test_only_the_old_command_reaches_into_evaluation():
    """Evaluating is not building: the app and the builder stand without it (the shim aside)."""
    importers = sorted(path.relative_to(ROOT).as_posix() for package in ("dino_demo", "index_builder")
                       for path in (ROOT / package).rglob("*.py")
                       if re.search(r"^\s*(from|import)\s+evaluation\b", path.read_text(), re.M))
    assert importers == ["index_builder/eval.py"]
