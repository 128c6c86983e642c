"""Behaviour of the whole flow on tiny random weights: shapes, invariants, equivalences, bad inputs."""
import numpy as np
import pytest
import torch

from iconmatting_core.context import ReferenceContext
from iconmatting_core.matching import MatchResult
from sample_inputs import make_reference, make_targets


def test_shapes_and_ranges(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(image, mask)
    assert isinstance(ctx, ReferenceContext)
    assert ctx.tokens.ndim == 2 and ctx.tokens.shape[1] == pipe.config.unet_feature_channels[1]
    assert ctx.token_counts == (ctx.tokens.shape[0],) and ctx.tokens.shape[0] > 0

    targets = make_targets(3, 90, 60)
    match = pipe.match(ctx, targets)
    grid = pipe.config.image_size // 16
    assert match.fused.shape == (3, pipe.config.fused_channels[0], grid, grid)
    assert match.similarity.shape == (3, 1, grid, grid)
    assert match.fused.device.type == "cpu"
    alphas = pipe.decode(match)
    assert len(alphas) == 3
    for a in alphas:
        assert a.shape == (90, 60) and a.dtype == torch.float32
        assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1


def test_any_size_and_aspect_ratio_and_input_kinds(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference((image.numpy() * 255).astype(np.uint8), mask.numpy() > 0.5)
    targets = [
        torch.rand(37, 201, 3),  # very wide
        torch.rand(300, 20, 4),  # very tall, RGBA
        torch.rand(64, 64),  # grayscale
        (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8),
    ]
    for mode in ("pad", "stretch"):
        alphas = pipe.matte(ctx, targets, resize_mode=mode)
        assert [tuple(a.shape) for a in alphas] == [(37, 201), (300, 20), (64, 64), (50, 70)]


def test_context_reused_equals_recomputed(pipe):
    image, mask = make_reference()
    targets = make_targets(2)
    ctx = pipe.encode_reference(image, mask)
    first = pipe.matte(ctx, targets)
    again = pipe.matte(ctx, targets)
    ctx2 = pipe.encode_reference(image, mask)
    recomputed = pipe.matte(ctx2, targets)
    assert torch.equal(ctx.tokens, ctx2.tokens)
    for a, b, c in zip(first, again, recomputed):
        assert torch.equal(a, b)
        assert (a - c).abs().max() <= 1e-6


def test_batch_equals_single_calls_and_chunking(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(image, mask)
    targets = make_targets(4)
    batched = pipe.matte(ctx, targets, chunk_size=3)
    singles = [pipe.matte(ctx, t)[0] for t in targets]
    for a, b in zip(batched, singles):
        assert (a - b).abs().max() <= 1e-5


def test_progress_called_per_chunk_and_can_interrupt(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(image, mask)
    calls = []
    pipe.match(ctx, make_targets(3), chunk_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 3), (3, 3)]

    class Stop(Exception):
        pass

    def interrupt(done, total):
        raise Stop()

    with pytest.raises(Stop):
        pipe.match(ctx, make_targets(3), chunk_size=1, progress=interrupt)


def test_multiple_references_in_one_context(pipe):
    im1, m1 = make_reference(seed=0)
    im2, m2 = make_reference(80, 80, seed=5)
    c1 = pipe.encode_reference(im1, m1)
    c2 = pipe.encode_reference(im2, m2)
    both = pipe.encode_reference([im1, im2], [m1, m2])
    assert both.num_references == 2
    assert both.token_counts == c1.token_counts + c2.token_counts
    merged = c1.merge(c2)
    assert torch.equal(merged.tokens, both.tokens)
    a = pipe.matte(both, make_targets(1))[0]
    b = pipe.matte(merged, make_targets(1))[0]
    assert torch.equal(a, b)


def test_similarity_follows_the_reference_region(pipe):
    """Matching a reference against itself puts more similarity mass inside the marked region."""
    image, mask = make_reference(128, 128)
    ctx = pipe.encode_reference(image, mask)
    match = pipe.match(ctx, image[None])
    sim = match.similarity[0, 0]
    grid = sim.shape[-1]
    cells = torch.nn.functional.interpolate(mask[None, None], size=(grid, grid), mode="area")[0, 0] > 0.99
    assert sim[cells].mean() > sim[~cells].mean()


def test_scribble_pooling_accepts_thin_strokes(pipe):
    image, _ = make_reference(128, 128)
    stroke = torch.zeros(128, 128)
    stroke[60:63, 20:100] = 1  # 3 px wide: no fully covered 16x16 cell
    with pytest.raises(ValueError, match="selects no 16x16-pixel cell.*scribble"):
        pipe.encode_reference(image, stroke)
    ctx = pipe.encode_reference(image, stroke, pooling="scribble")
    assert ctx.tokens.shape[0] >= 5


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (torch.rand(64, 64, 3), torch.ones(32, 32), "mask 0 is 32x32 .* image is 64x64"),
        (torch.rand(64, 64, 3), torch.zeros(64, 64), "mask 0 is empty"),
        (torch.rand(64, 64, 3), torch.ones(64, 64), "covers the whole image"),
        (torch.full((64, 64, 3), float("nan")), torch.ones(64, 64), "NaN"),
        (torch.rand(0, 64, 3), torch.ones(0, 64), "empty \\(size 0x64\\)"),
        (torch.rand(64, 64, 5), torch.ones(64, 64), "HxWxC with C in"),
        (torch.rand(64, 64, 3), torch.full((64, 64), float("nan")), "mask 0 contains NaN"),
    ],
)
def test_bad_reference_inputs(pipe, image, mask, message):
    with pytest.raises(ValueError, match=message):
        pipe.encode_reference(image, mask)


def test_bad_target_inputs_and_options(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(image, mask)
    with pytest.raises(ValueError, match="target image 1 contains NaN"):
        pipe.match(ctx, [torch.rand(20, 20, 3), torch.full((20, 20, 3), float("nan"))])
    with pytest.raises(ValueError, match="no target images"):
        pipe.match(ctx, [])
    with pytest.raises(ValueError, match="resize mode"):
        pipe.match(ctx, make_targets(1), resize_mode="crop")
    with pytest.raises(ValueError, match="pooling"):
        pipe.encode_reference(image, mask, pooling="average")
    with pytest.raises(ValueError, match="2 reference images but 3 masks"):
        pipe.encode_reference(torch.stack([image, image]), torch.stack([mask, mask, mask]))
    with pytest.raises(TypeError, match="ReferenceContext"):
        pipe.match("not a context", make_targets(1))


def test_one_mask_broadcast_over_reference_batch(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(torch.stack([image, image]), mask[None])
    assert ctx.num_references == 2 and ctx.token_counts[0] == ctx.token_counts[1]


def test_match_results_concat_and_slice(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(image, mask)
    m = pipe.match(ctx, make_targets(3))
    joined = MatchResult.concat([m.slice(0, 1), m.slice(1, 3)])
    assert torch.equal(joined.fused, m.fused) and joined.placements == m.placements


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_paths_run(tiny_dir, dtype):
    from iconmatting_core.pipeline import IconMattingPipeline, load_model

    half = IconMattingPipeline(load_model(tiny_dir / "head.safetensors", tiny_dir / "sd", dtype))
    assert half.model.dtype == dtype
    image, mask = make_reference()
    ctx = half.encode_reference(image, mask)
    alphas = half.matte(ctx, make_targets(2))
    full = IconMattingPipeline(load_model(tiny_dir / "head.safetensors", tiny_dir / "sd", "fp32"))
    ref = full.matte(full.encode_reference(image, mask), make_targets(2))
    for a, r in zip(alphas, ref):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - r).abs().mean() < 0.05


def test_matte_chunk_by_chunk_equals_match_then_decode(pipe):
    image, mask = make_reference()
    ctx = pipe.encode_reference(image, mask)
    targets = make_targets(3)
    calls = []
    chunked = pipe.matte(ctx, targets, chunk_size=2, progress=lambda d, t: calls.append((d, t)))
    whole = pipe.decode(pipe.match(ctx, targets, chunk_size=3), chunk_size=3)
    assert calls == [(2, 3), (3, 3)]
    for a, b in zip(chunked, whole):
        assert (a - b).abs().max() <= 1e-5
    bad = [targets[0], targets[1], torch.full((20, 20, 3), float("nan"))]
    with pytest.raises(ValueError, match="target image 2 contains NaN"):
        pipe.matte(ctx, bad, chunk_size=1, progress=lambda d, t: pytest.fail("work started before validation"))


def test_loading_resolves_auto_precision_and_every_overflow_error_recommends_it(tiny_dir):
    """load_model and load_pipeline default to "auto" (the rule: tests/unit/test_precision.py), fp32 on the CPU; every
    overflow error recommends the two precisions "auto" picks."""
    import inspect

    from iconmatting_core import pipeline as pl

    assert inspect.signature(pl.load_model).parameters["dtype"].default == "auto"
    assert inspect.signature(pl.load_pipeline).parameters["dtype"].default == "auto"
    assert pl.load_model(tiny_dir / "head.safetensors", tiny_dir / "sd").dtype == torch.float32  # for the CPU
    with pytest.raises(FloatingPointError, match=r"matting head overflowed in torch.float16 \(NaN/inf\): load IconMatting in fp32 or bf16"):
        pl._check_finite(torch.tensor([float("nan")]), "matting head", torch.float16)


def test_matte_checks_every_target_once_and_prepares_it_once(pipe, monkeypatch):
    """matte() over 3 targets: each image is checked once (before any model work) and brought to the model's
    input once, for matching and decoding alike (decode alone prepares again: its MatchResult keeps only the
    sources); the alphas stay those of match + decode."""
    from iconmatting_core import pipeline, preprocess

    context = pipe.encode_reference(*make_reference())
    targets = list(make_targets(3, 40, 56))
    expected = pipe.decode(pipe.match(context, targets), chunk_size=1)  # matte's chunks: one target
    checked, prepared = [], []
    to_rgb, prepare_image = preprocess.to_rgb, preprocess.prepare_image
    monkeypatch.setattr(pipeline.pre, "to_rgb", lambda img, name="image": checked.append(name) or to_rgb(img, name))
    monkeypatch.setattr(pipeline.pre, "prepare_image", lambda *a, **k: prepared.append(1) or prepare_image(*a, **k))
    alphas = pipe.matte(context, targets)
    assert sorted(set(checked)) == ["target image 0", "target image 1", "target image 2"]
    assert len(prepared) == 3
    assert checked.count("target image 1") == 2  # the check, then the conversion that prepares it
    assert all(torch.equal(a, b) for a, b in zip(alphas, expected))
