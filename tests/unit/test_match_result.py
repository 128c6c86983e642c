"""MatchResult bookkeeping and the padded-cell map, on plain tensors (no model, fast).

Expected values are literals or slices written here, never taken from the code under test.
"""
import pytest
import torch

from iconmatting_core.matching import TOKEN_CHUNK, MatchResult, _padded_cells
from iconmatting_core.preprocess import Placement


def result(n, start=0, mode="pad"):
    """n targets whose tensors/sources/placements all carry their index (start, start+1, ...)."""
    idx = torch.arange(start, start + n, dtype=torch.float32)
    return MatchResult(
        fused=idx[:, None, None, None].expand(n, 2, 3, 3).clone(),
        similarity=(idx + 100)[:, None, None, None].expand(n, 1, 3, 3).clone(),
        sources=[f"src{i}" for i in range(start, start + n)],
        placements=[Placement(64, 64, 10 + i, 20 + i) for i in range(start, start + n)],
        **({} if mode is None else {"resize_mode": mode}),
    )


def test_default_resize_mode_is_pad_and_len_counts_targets():
    r = result(3, mode=None)
    assert r.resize_mode == "pad"
    assert len(r) == 3
    assert TOKEN_CHUNK == 4096


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_concat_keeps_order_and_mode(mode):
    joined = MatchResult.concat([result(2, 0, mode), result(1, 2, mode), result(2, 3, mode)])
    assert len(joined) == 5
    assert joined.resize_mode == mode
    assert joined.fused[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert joined.similarity[:, 0, 0, 0].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert joined.sources == ["src0", "src1", "src2", "src3", "src4"]
    assert joined.placements == [Placement(64, 64, 10 + i, 20 + i) for i in range(5)]
    assert MatchResult.concat([result(1, 7, mode)]).sources == ["src7"]


def test_concat_refuses_mixed_modes_and_nothing_exactly():
    with pytest.raises(ValueError, match=r"^cannot concatenate match results made with different resize modes$"):
        MatchResult.concat([result(1), result(1, 1, "stretch")])
    with pytest.raises(ValueError, match=r"^no match results to concatenate$"):
        MatchResult.concat([])


def test_slice_cuts_every_field_alike():
    part = result(5, mode="stretch").slice(1, 4)
    assert len(part) == 3
    assert part.resize_mode == "stretch"
    assert part.fused[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert part.similarity[:, 0, 0, 0].tolist() == [101.0, 102.0, 103.0]
    assert part.sources == ["src1", "src2", "src3"]
    assert part.placements == [Placement(64, 64, 11, 21), Placement(64, 64, 12, 22), Placement(64, 64, 13, 23)]


def test_to_casts_fused_only_and_keeps_the_rest():
    r = result(2, mode="stretch")
    moved = r.to("cpu", torch.float64)
    assert moved.fused.dtype == torch.float64 and moved.similarity.dtype == torch.float32
    assert moved.fused[:, 0, 0, 0].tolist() == [0.0, 1.0]
    assert moved.similarity[:, 0, 0, 0].tolist() == [100.0, 101.0]
    assert moved.sources == ["src0", "src1"] and moved.resize_mode == "stretch"
    assert moved.placements == r.placements
    assert r.to("cpu").fused.dtype == torch.float32


def test_padded_cells_none_when_all_image_else_the_complement():
    assert _padded_cells(None, 4) is None
    assert _padded_cells(torch.ones(2, 4, 4, dtype=torch.bool), 4) is None
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, :, 3] = False  # last column padding
    want = torch.zeros(1, 4, 4, dtype=torch.bool)
    want[0, :, 3] = True
    assert torch.equal(_padded_cells(valid, 4), want)


def test_padded_cells_on_a_coarser_grid_count_a_cell_with_any_image_child():
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :3, :1] = True  # image in rows 0-2 of column 0
    # 2x2 grid: cell (r, c) covers rows 2r..2r+1, cols 2c..2c+1; image in (0,0) and (1,0)
    want = torch.tensor([[[False, True], [False, True]]])
    assert torch.equal(_padded_cells(valid, 2), want)


def test_concat_can_be_called_on_an_instance_too():
    r = result(1, 4)
    assert r.concat([r, result(1, 5)]).sources == ["src4", "src5"]


@torch.no_grad()
def test_guidance_weights_of_padded_keys_are_zero_even_for_a_nonzero_similarity():
    """intra_image_propagation on its own: a similarity that is not 0 on padding still gives padded key cells
    weight 0 (through match_features the similarity is already 0 there)."""
    from iconmatting_core import preprocess as pre
    from iconmatting_core.matching import intra_image_propagation
    from tiny_models import tiny_config, tiny_head

    head = tiny_head(tiny_config(), seed=3)
    g = torch.Generator().manual_seed(4)
    placements = [pre.placement_for(40, 128, 128, "pad"), pre.placement_for(128, 70, 128, "pad")]
    valid = pre.valid_cells(placements, 128, 8)
    attention = {r: torch.rand(2, r * r, r * r, generator=g) for r in (4, 8)}
    got = intra_image_propagation(head, torch.ones(2, 1, 8, 8), attention, valid=valid)
    for out, (res, layer) in zip(got, head.guidance_layers().items()):
        keys = torch.stack([pre.content_cells(p, 128, res) for p in placements]).reshape(2, 1, res * res)
        weighted = (attention[res] * keys).reshape(2, res, res, res * res)  # similarity 1 on image keys, 0 on padding
        assert torch.allclose(out, layer(weighted), atol=1e-6), res


def test_wrong_valid_map_message_word_for_word():
    from iconmatting_core.features import ImageFeatures
    from iconmatting_core.matching import match_features
    from tiny_models import tiny_config, tiny_head

    head = tiny_head(tiny_config(), seed=3)
    up = (torch.zeros(1, 64, 4, 4), torch.zeros(1, 64, 8, 8))
    attention = {r: torch.full((1, r * r, r * r), 1.0 / (r * r)) for r in (4, 8)}
    with pytest.raises(ValueError) as err:
        match_features(head, torch.randn(3, 64), ImageFeatures(up, attention), valid=torch.ones(1, 8, 4, dtype=torch.bool))
    assert str(err.value) == "valid must be a bool map [B, h, w] = [1, 8, 8] of the target cells that hold image, got [1, 8, 4]"


@torch.no_grad()
def test_features_are_cast_to_the_head_dtype():
    """float32 features and attention on a float64 head: cast to float64 (the same as float64 up-features given)."""
    from iconmatting_core.features import ImageFeatures
    from iconmatting_core.matching import match_features
    from tiny_models import tiny_config, tiny_head

    head = tiny_head(tiny_config(), seed=3).double()
    g = torch.Generator().manual_seed(6)
    up = (torch.randn(1, 64, 4, 4, generator=g), torch.randn(1, 64, 8, 8, generator=g))
    attention = {r: torch.rand(1, r * r, r * r, generator=g) for r in (4, 8)}
    tokens = torch.randn(3, 64, generator=g)
    fused, _ = match_features(head, tokens, ImageFeatures(up, attention))
    want, _ = match_features(head, tokens, ImageFeatures(tuple(f.double() for f in up), attention))
    assert fused.dtype == torch.float64 and torch.equal(fused, want)
