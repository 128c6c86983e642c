"""Matching across chunks: token chunks, concatenated results, decoding in several chunks.

Expected values come from formulas written here (one softmax over all tokens at once) or from the
stretch/pad building blocks of ``preprocess`` applied by hand, never from the code under test.
"""
import pytest
import torch

from iconmatting_core import preprocess as pre
from iconmatting_core.matching import MatchResult, inter_image_similarity, match_features
from sample_inputs import make_reference
from tiny_models import tiny_config, tiny_head

SIZE = 128  # tiny model: similarity grid 8


@pytest.fixture(scope="module")
def head():
    return tiny_head(tiny_config(), seed=5)


def naive_similarity(head, tokens, correspondence, keep=None):
    """One softmax per token over the (kept) target cells, all tokens at once, summed over tokens."""
    norm = head.similarity.token_norm
    b, c, h, w = correspondence.shape
    target = norm(correspondence.reshape(b, c, h * w).permute(0, 2, 1))  # [B, hw, C]
    logits = torch.einsum("nc,bpc->bnp", norm(tokens), target) / c**0.5  # [B, N, hw]
    out = torch.zeros(b, h * w)
    for i in range(b):
        cells = torch.ones(h * w, dtype=torch.bool) if keep is None else keep[i].reshape(-1)
        out[i, cells] = logits[i][:, cells].softmax(-1).sum(0)
    return out.reshape(b, 1, h, w)


@pytest.mark.parametrize("n_tokens", [4096 * 2 + 5, 4097])
@torch.no_grad()
def test_contexts_over_4096_tokens_keep_every_token(head, n_tokens):
    g = torch.Generator().manual_seed(n_tokens)
    tokens = torch.randn(n_tokens, 64, generator=g)
    correspondence = torch.randn(2, 64, 8, 8, generator=g)
    got = inter_image_similarity(head, tokens, correspondence)
    # each token's attention sums to 1 over the target cells: the map sums to the token count
    assert torch.allclose(got.flatten(1).sum(1), torch.full((2,), float(n_tokens)), rtol=1e-5)
    assert torch.allclose(got, naive_similarity(head, tokens, correspondence), rtol=1e-4, atol=1e-3)
    # the tail tokens matter: dropping the last one changes the map by about one token's share
    fewer = inter_image_similarity(head, tokens[:-1], correspondence)
    assert float((got - fewer).abs().sum()) == pytest.approx(2.0, rel=1e-3)


def test_small_token_chunks_with_padding_equal_one_softmax(head):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(11, 64, generator=g)
    correspondence = torch.randn(2, 64, 8, 8, generator=g)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0, :, 5:] = False  # image in the first 5 columns
    valid[1, 3:] = False  # image in the first 3 rows
    want = naive_similarity(head, tokens, correspondence, keep=valid)
    for chunk in (1, 3, 4, 11, 4096):
        got = inter_image_similarity(head, tokens, correspondence, token_chunk=chunk, valid=valid)
        assert torch.allclose(got, want, atol=1e-5), chunk
        assert (got[:, 0][~valid] == 0).all()


def test_default_token_chunk_is_4096():
    import inspect

    assert inspect.signature(inter_image_similarity).parameters["token_chunk"].default == 4096


def test_match_features_rejects_a_wrong_valid_map(head):
    from iconmatting_core.features import ImageFeatures

    cfg = tiny_config()
    up = (torch.zeros(1, 64, 4, 4), torch.zeros(1, 64, 8, 8))
    attention = {r: torch.full((1, r * r, r * r), 1.0 / (r * r)) for r in cfg.attention_resolutions}
    tokens = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"valid must be a bool map \[B, h, w\] = \[1, 8, 8\] .* got \[1, 8, 4\]"):
        match_features(head, tokens, ImageFeatures(up, attention), valid=torch.ones(1, 8, 4, dtype=torch.bool))


# --- through the pipeline -------------------------------------------------------------------------

def alpha_by_hand(pipe, fused, image, mode):
    """The head on one target prepared by hand with the given resize mode, back at the original size."""
    x, placement = pre.prepare_image(pre.to_rgb(image), SIZE, mode)
    assert placement == pre.placement_for(image.shape[0], image.shape[1], SIZE, mode)
    alpha = pipe.model.head.detail(fused[None], x[None]).float()[0]
    return pre.restore_alpha(alpha, placement)


def odd_targets():
    g = torch.Generator().manual_seed(9)
    sizes = [(40, 128), (128, 50), (90, 60), (33, 77), (100, 100)]
    return [torch.rand(h, w, 3, generator=g) for h, w in sizes]


@torch.no_grad()
def test_stretch_survives_match_chunks_and_concat(pipe):
    image, mask = make_reference(128, 128)
    ctx = pipe.encode_reference(image, mask)
    targets = odd_targets()[:3]
    match = pipe.match(ctx, targets, resize_mode="stretch", chunk_size=1)
    assert match.resize_mode == "stretch"
    joined = MatchResult.concat([match.slice(0, 1), match.slice(1, 3)])
    assert joined.resize_mode == "stretch"
    alphas = pipe.decode(joined, chunk_size=2)
    for i, (t, a) in enumerate(zip(targets, alphas)):
        want = alpha_by_hand(pipe, joined.fused[i], t, "stretch")
        assert torch.allclose(a, want, atol=1e-6), i
        # and it is not what letterboxing would give (the test can tell the two apart)
        assert not torch.allclose(a, alpha_by_hand(pipe, joined.fused[i], t, "pad"), atol=1e-3)


@torch.no_grad()
def test_decoding_more_targets_than_one_chunk_keeps_each_target_with_its_image(pipe):
    image, mask = make_reference(128, 128)
    ctx = pipe.encode_reference(image, mask)
    targets = odd_targets()
    match = pipe.match(ctx, targets, chunk_size=5)
    alphas = pipe.decode(match)  # the default chunk (4) < 5 targets
    assert [tuple(a.shape) for a in alphas] == [(40, 128), (128, 50), (90, 60), (33, 77), (100, 100)]
    for i, (t, a) in enumerate(zip(targets, alphas)):
        assert torch.allclose(a, alpha_by_hand(pipe, match.fused[i], t, "pad"), atol=1e-6), i
    calls = []
    again = pipe.decode(match, chunk_size=2, progress=lambda d, n: calls.append((d, n)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert all(torch.equal(a, b) for a, b in zip(alphas, again))


def test_concat_refuses_mixed_modes_and_nothing(pipe):
    image, mask = make_reference(128, 128)
    ctx = pipe.encode_reference(image, mask)
    targets = odd_targets()[:1]
    pad = pipe.match(ctx, targets)
    stretch = pipe.match(ctx, targets, resize_mode="stretch")
    with pytest.raises(ValueError, match="different resize modes"):
        MatchResult.concat([pad, stretch])
    with pytest.raises(ValueError, match="no match results"):
        MatchResult.concat([])
    both = MatchResult.concat([pad, pad])
    assert len(both) == 2 and both.sources[1] is targets[0] and torch.equal(both.similarity[1], pad.similarity[0])
