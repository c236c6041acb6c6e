import faiss
import pytest

from dino_demo.errors import UserError
from dino_demo.index_types import FLAT_MAX, choose_layout, choose_spec
from dino_demo.patch_select import PatchLayout


def test_small_collections_get_exact_search_and_large_ones_ivf_pq():
    assert choose_spec(FLAT_MAX["global"], 384, "global").factory == "Flat"
    big = choose_spec(1_000_000, 384, "global")
    assert big.factory == "IVF4096_HNSW32,PQ48x8,Refine(SQ8)"
    assert big.search_params == "nprobe=512,quantizer_efSearch=1024,k_factor_rf=10"
    assert choose_spec(FLAT_MAX["patch"], 384, "patch").factory == "Flat"
    assert choose_spec(16_000_000, 384, "patch").factory == "IVF16384_HNSW32,PQ32x8,Refine(SQ8)"


def test_the_override_forces_either_type_but_a_tiny_set_stays_exact():
    assert choose_spec(10**7, 384, "global", "flat").factory == "Flat"
    assert choose_spec(5_000, 384, "global", "compressed").factory.startswith("IVF")
    assert choose_spec(999, 384, "global", "compressed").factory == "Flat"
    with pytest.raises(UserError, match="index-type"):
        choose_spec(10, 384, "global", "hnsw")


@pytest.mark.parametrize("count, dim, kind", [(1_000, 32, "global"), (50_000, 384, "patch"), (5_000_000, 768, "global")])
def test_each_chosen_factory_string_builds_in_faiss(count, dim, kind):
    spec = choose_spec(count, dim, kind, "compressed")
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    faiss.ParameterSpace().set_index_parameters(index, spec.search_params)
    nlist = faiss.extract_index_ivf(index).nlist
    assert nlist & (nlist - 1) == 0 and count // nlist >= 39  # enough training points per list


def test_auto_patches_keep_every_patch_of_a_small_collection_only():
    assert choose_layout("auto", 500, None) == PatchLayout("all")
    assert choose_layout("auto", 10**6, 100) == PatchLayout("all")  # --limit makes it small
    assert choose_layout("auto", 10**6, None) == PatchLayout("pooled")
    assert choose_layout("auto", None, None) == PatchLayout("pooled")  # a stream of unknown length
    assert choose_layout("salient:8", 5, None) == PatchLayout("salient", 8)
