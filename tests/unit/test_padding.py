"""Letterbox padding takes no part in matching: no similarity mass, no guidance, no region token."""
import pytest
import torch
import torch.nn.functional as F

from iconmatting_core import preprocess as pre
from iconmatting_core.context import cell_selection
from iconmatting_core.features import ImageFeatures
from iconmatting_core.matching import inter_image_similarity, intra_image_propagation, match_features
from oracles import cell_mask, prepare_mask
from sample_inputs import make_reference
from tiny_models import tiny_config, tiny_head

SIZE = 128  # tiny model: similarity grid 8 (16 px cells), attention grids 4 (32 px) and 8 (16 px)


# --- the formula before padding was taken out, kept as the oracle ------------------------------

def old_inter_image_similarity(head, tokens, correspondence, token_chunk=4096):
    norm = head.similarity.token_norm
    b, c, h, w = correspondence.shape
    scale = c**-0.5
    target = norm(correspondence.float().flatten(2).transpose(1, 2).to(norm.weight.dtype)).float()
    out = torch.zeros(b, h * w, device=correspondence.device, dtype=torch.float32)
    for start in range(0, tokens.shape[0], token_chunk):
        ref = norm(tokens[start : start + token_chunk].to(correspondence.device, norm.weight.dtype)).float()
        sim = torch.einsum("nc,bpc->bnp", ref, target) * scale
        out += sim.softmax(dim=-1).sum(dim=1)
    return out.view(b, 1, h, w)


def old_intra_image_propagation(head, similarity, attention):
    out = []
    dtype = head.similarity.token_norm.weight.dtype
    for res, layer in head.guidance_layers().items():
        attn = attention[res]
        b = attn.shape[0]
        weights = F.interpolate(similarity, size=(res, res), mode="bilinear", align_corners=True).view(b, 1, res * res)
        weighted = (attn * weights).view(b, res, res, res * res)
        out.append(layer(weighted.to(dtype)))
    return out


def old_match_features(head, tokens, features):
    similarity = old_inter_image_similarity(head, tokens, features.correspondence)
    guidance = old_intra_image_propagation(head, similarity, features.attention)
    dtype = head.similarity.token_norm.weight.dtype
    fused = head.fusion([f.to(dtype) for f in features.up_features], guidance)
    return fused, similarity


# --- helpers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head():
    return tiny_head(tiny_config(), seed=3)


def random_features(batch, seed=0):
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    c0, c1 = cfg.unet_feature_channels
    up = (torch.randn(batch, c0, SIZE // 32, SIZE // 32, generator=g), torch.randn(batch, c1, SIZE // 16, SIZE // 16, generator=g))
    attention = {r: torch.rand(batch, r * r, r * r, generator=g).softmax(-1) for r in cfg.attention_resolutions}
    tokens = torch.randn(7, c1, generator=g)
    return ImageFeatures(up, attention), tokens


def capture_weighted(head):
    """Records what each attention-propagation layer receives: {r: [B, r, r, r*r]}."""
    seen, handles = {}, []
    for res, layer in head.guidance_layers().items():
        handles.append(layer.register_forward_pre_hook(lambda mod, args, res=res: seen.__setitem__(res, args[0].clone())))
    return seen, handles


# --- valid cells ----------------------------------------------------------------------------------

def test_content_cells_at_each_grid():
    p = pre.placement_for(40, 128, SIZE, "pad")  # content 40 x 128: 2.5 rows of 16-px cells
    assert (p.content_height, p.content_width) == (40, 128)
    v16 = pre.content_cells(p, SIZE, 8)
    assert v16[:3].all() and not v16[3:].any()  # the partly padded row 2 holds image
    v32 = pre.content_cells(p, SIZE, 4)
    assert v32[:2].all() and not v32[2:].any()
    # coarser grid = max-pooling of the finer one (the content is a top-left rectangle)
    pooled = F.max_pool2d(v16[None, None].float(), 2)[0, 0] > 0
    assert torch.equal(pooled, v32)
    for mode, hw in (("stretch", (40, 128)), ("pad", (77, 77))):
        assert pre.content_cells(pre.placement_for(*hw, SIZE, mode), SIZE, 8).all()
    assert pre.valid_cells([p, pre.placement_for(128, 30, SIZE, "pad")], SIZE, 8).shape == (2, 8, 8)


# --- square inputs: bit-identical to the old formula -----------------------------------------------

def test_square_inputs_are_bit_identical_to_the_old_formula(head):
    feats, tokens = random_features(2)
    want_fused, want_sim = old_match_features(head, tokens, feats)
    squares = [pre.placement_for(90, 90, SIZE, "pad"), pre.placement_for(30, 200, SIZE, "stretch")]
    for valid in (None, squares, torch.ones(2, 8, 8, dtype=torch.bool)):
        fused, sim = match_features(head, tokens, feats, valid=valid)
        assert torch.equal(sim, want_sim) and torch.equal(fused, want_fused)


# --- letterboxed inputs: padding gets nothing -------------------------------------------------------

def test_padded_cells_get_no_similarity_and_no_guidance(head):
    feats, tokens = random_features(2, seed=1)
    placements = [pre.placement_for(40, 128, SIZE, "pad"), pre.placement_for(128, 70, SIZE, "pad")]
    valid = pre.valid_cells(placements, SIZE, 8)
    seen, handles = capture_weighted(head)
    try:
        fused, sim = match_features(head, tokens, feats, valid=placements)
    finally:
        for h in handles:
            h.remove()
    # similarity: exactly 0 on padding; each token's softmax sums to 1 over the image cells
    assert (sim[:, 0][~valid] == 0).all() and (sim[:, 0][valid] > 0).all()
    assert torch.allclose(sim.flatten(1).sum(1), torch.full((2,), float(tokens.shape[0])), rtol=1e-5)
    # oracle: softmax restricted to the image cells
    norm = head.similarity.token_norm
    target = norm(feats.correspondence.flatten(2).transpose(1, 2))
    logits = torch.einsum("nc,bpc->bnp", norm(tokens), target) * feats.correspondence.shape[1] ** -0.5
    for b in range(2):
        keep = valid[b].flatten()
        want = torch.zeros(64)
        want[keep] = logits[b][:, keep].softmax(-1).sum(0)
        assert torch.allclose(sim[b, 0].flatten(), want, atol=1e-6)
    # guidance: every padded key cell of every attention grid gets weight exactly 0
    for res, weighted in seen.items():
        key_valid = torch.stack([pre.content_cells(p, SIZE, res) for p in placements]).flatten(1)  # [B, r*r]
        assert weighted.shape == (2, res, res, res * res)
        assert (weighted.permute(0, 3, 1, 2)[~key_valid] == 0).all()
        assert (weighted.permute(0, 3, 1, 2)[key_valid] != 0).any()
        weights = F.interpolate(sim, size=(res, res), mode="bilinear", align_corners=True).view(2, 1, res * res)
        want = (feats.attention[res] * weights * key_valid[:, None]).view(2, res, res, res * res)
        assert torch.equal(weighted, want)
    # the padding really did change the result (else this test would prove nothing)
    old_fused, old_sim = old_match_features(head, tokens, feats)
    assert not torch.allclose(old_sim, sim) and not torch.allclose(old_fused, fused)


def test_parts_accept_the_valid_map(head):
    feats, tokens = random_features(1, seed=2)
    valid = pre.valid_cells([pre.placement_for(128, 20, SIZE, "pad")], SIZE, 8)
    sim = inter_image_similarity(head, tokens, feats.correspondence, valid=valid)
    assert (sim[0, 0, :, 2:] == 0).all() and (sim[0, 0, :, :2] > 0).all()
    guidance = intra_image_propagation(head, sim, feats.attention, valid=valid)
    assert [g.shape[-1] for g in guidance] == [4, 8]
    with pytest.raises(ValueError, match="valid must be a bool map"):
        match_features(head, tokens, feats, valid=torch.ones(1, 4, 4, dtype=torch.bool))


def test_pipeline_match_keeps_padding_out(pipe):
    image, mask = make_reference(128, 128)
    ctx = pipe.encode_reference(image, mask)
    wide = torch.rand(30, 120, 3, generator=torch.Generator().manual_seed(5))
    match = pipe.match(ctx, [wide, image])
    p = match.placements[0]
    valid = pre.content_cells(p, SIZE, 8)
    assert not valid.all()
    sim = match.similarity[0, 0]
    assert (sim[~valid] == 0).all()
    assert float(sim.sum()) == pytest.approx(ctx.tokens.shape[0], rel=1e-5)
    assert float(match.similarity[1, 0].sum()) == pytest.approx(ctx.tokens.shape[0], rel=1e-5)


# --- reference tokens: a padded cell never becomes one ---------------------------------------------

@pytest.mark.parametrize("hw", [(40, 128), (128, 50), (37, 101)])
@pytest.mark.parametrize("pooling", ["mask", "scribble"])
def test_padded_cells_never_become_region_tokens(hw, pooling):
    h, w = hw
    p = pre.placement_for(h, w, SIZE, "pad")
    mask = torch.ones(h, w)
    mask[0, 0] = 0  # everything but one pixel
    selected = cell_selection(mask, p, SIZE, 8, pooling)
    valid = pre.content_cells(p, SIZE, 8)
    assert selected.any() and not (selected & ~valid).any()
    if pooling == "scribble":
        assert torch.equal(selected, valid)  # every cell holding image is touched
    else:  # only cells entirely inside the content and fully covered
        stride = SIZE // 8
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[: p.content_height // stride, : p.content_width // stride] = True
        inside[0, 0] = False
        assert torch.equal(selected, inside)
    # the old path (mask shrunk to the input, padded with 0) agrees on which cells are padding
    old = cell_mask(prepare_mask(mask, p, SIZE), 8, pooling)
    assert not (old & ~valid).any()


def test_pipeline_reference_tokens_skip_padding(pipe):
    image = torch.rand(40, 128, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(40, 128)
    mask[:, :3] = 0
    ctx = pipe.encode_reference(image, mask, pooling="scribble")
    assert ctx.tokens.shape[0] == int(pre.content_cells(pre.placement_for(40, 128, SIZE, "pad"), SIZE, 8).sum())
