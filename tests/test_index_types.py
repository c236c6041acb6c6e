import faiss
import numpy as np
import pytest

from dino_demo.errors import UserError
from dino_demo.index_types import FLAT_MAX, IndexSpec, build_faiss, choose_layout, choose_spec, open_faiss_file
from dino_demo.patch_select import PatchLayout


def test_small_collections_get_exact_search_and_large_ones_a_graph_or_ivf_pq():
    assert choose_spec(FLAT_MAX["global"], 384, "global").factory == "Flat"
    assert choose_spec(200_000, 384, "global") == IndexSpec("HNSW32,SQ8", "efSearch=128")
    assert choose_spec(5_000_000, 384, "global") == IndexSpec("HNSW32,SQ8", "efSearch=256")
    assert choose_spec(FLAT_MAX["patch"], 384, "patch").factory == "Flat"
    big = choose_spec(16_000_000, 384, "patch")
    assert big.factory == "IVF16384_HNSW32,PQ32x8,Refine(SQ8)"
    assert big.search_params == "nprobe=128,quantizer_efSearch=256,k_factor_rf=1"  # at most NPROBE_MAX lists
    assert choose_spec(1_960_000, 384, "patch").search_params.startswith("nprobe=128,")  # 10k images: nlist 4096 / 32


def test_the_override_forces_either_type_but_a_tiny_set_stays_exact():
    assert choose_spec(10**7, 384, "global", "flat").factory == "Flat"
    assert choose_spec(5_000, 384, "global", "compressed").factory == "HNSW32,SQ8"
    assert choose_spec(5_000, 384, "patch", "compressed").factory.startswith("IVF")
    assert choose_spec(999, 384, "global", "compressed").factory == "Flat"
    with pytest.raises(UserError, match="index-type"):
        choose_spec(10, 384, "global", "hnsw")


@pytest.mark.parametrize("count, dim", [(1_000, 32), (50_000, 384), (5_000_000, 768)])
def test_each_chosen_patch_factory_string_builds_in_faiss(count, dim):
    spec = choose_spec(count, dim, "patch", "compressed")
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    faiss.ParameterSpace().set_index_parameters(index, spec.search_params)
    nlist = faiss.extract_index_ivf(index).nlist
    assert nlist & (nlist - 1) == 0 and count // nlist >= 39  # enough training points per list


def test_a_global_graph_index_keeps_its_build_and_search_settings_and_finds_what_exact_search_finds(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64)).astype(np.float32)
    vectors = centres[rng.integers(0, 50, 5000)] + 0.5 * rng.standard_normal((5000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = choose_spec(len(vectors), 64, "global", "compressed")
    faiss.write_index(build_faiss(spec, 64, vectors, lambda: [vectors[:2500], vectors[2500:]]), str(tmp_path / "g.faiss"))
    index = open_faiss_file(str(tmp_path / "g.faiss"), spec.search_params)
    graph = faiss.downcast_index(index).hnsw
    assert graph.efSearch == 128 and graph.efConstruction == 160  # build setting saved, search setting applied on opening
    _, found = index.search(vectors[:100], 10)
    exact = np.argsort(-(vectors[:100] @ vectors.T), axis=1)[:, :10]
    assert (found[:, 0] == np.arange(100)).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) >= 0.95


def test_auto_patches_keep_every_patch_of_a_small_collection_only():
    assert choose_layout("auto", 500, None) == PatchLayout("all")
    assert choose_layout("auto", 10**6, 100) == PatchLayout("all")  # --limit makes it small
    assert choose_layout("auto", 10**6, None) == PatchLayout("pooled")
    assert choose_layout("auto", None, None) == PatchLayout("pooled")  # a stream of unknown length
    assert choose_layout("salient:8", 5, None) == PatchLayout("salient", 8)
