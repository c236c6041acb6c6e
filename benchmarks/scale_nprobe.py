"""Image-search recall@10 and time against nprobe and k_factor_rf, on scale.py's synthetic CLS vectors.

    .venv/bin/python benchmarks/scale_nprobe.py 10000
"""
import sys, time; from pathlib import Path; ROOT = Path(__file__).resolve().parents[1]; sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
import faiss, numpy as np
from scale import Synthetic, CHUNK
from dino_demo.index_types import choose_spec, build_faiss
faiss.omp_set_num_threads(2)
n = int(sys.argv[1]); data = Synthetic(n)
cls = np.concatenate([data.images(s, min(CHUNK, n - s))[0] for s in range(0, n, CHUNK)])
q = data.images(10**9, 200)[0]
truth = np.argsort(-(q @ cls.T), axis=1)[:, :10]
spec = choose_spec(n, 384, "global", "compressed")
index = build_faiss(spec, 384, cls, lambda: [cls])
nlist = faiss.extract_index_ivf(index).nlist
for div in (8, 4, 2, 1):
    for kf in (10, 50):
        nprobe = max(1, nlist // div)
        faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nprobe},quantizer_efSearch={2*nprobe},k_factor_rf={kf}")
        t = time.perf_counter(); _, ids = index.search(q, 10); ms = (time.perf_counter() - t) / len(q) * 1000
        r = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        print(f"{spec.factory} nprobe={nprobe} (nlist/{div}) k_factor_rf={kf}: recall@10 {r:.3f}, {ms:.2f} ms/query (batched)")
