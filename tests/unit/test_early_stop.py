"""The UNet pass and its early stop (``features.FeatureExtractor``) on the diffusers path, fast: where a pass
stops is read off the UNet's layout before any pass, so every pass, the first included and whatever ran
before it, stops at the same place, with the features and maps of a pass that runs the whole UNet; and no
wrapper another extension puts around the UNet can swallow the stop. (The native path: tests/host/test_comfy_pack.py.)"""
from contextlib import contextmanager

import pytest
import torch

from sample_inputs import make_reference, make_targets
from iconmatting_core.features import PassStop, plan_stops
from iconmatting_core.pipeline import IconMattingPipeline, build_model
from iconmatting_core.sd_features import SDFeatureExtractor, unet_layout
from iconmatting_core.sd_loading import load_sd_components
from tiny_models import SD_SELF_ATTENTION_LAYOUT, tiny_config, tiny_head

#: passes that run the whole UNet (the reference point of the stopped ones)
WHOLE_UNET = {False: PassStop(None, None), True: PassStop(None, None)}

SD_LAYOUT = SD_SELF_ATTENTION_LAYOUT  # the tiny UNet keeps SD 2.1's


@pytest.fixture()
def fresh(tiny_dir):
    """A new extractor over newly loaded tiny SD modules, as after a Load: no pass has run yet."""
    sd = load_sd_components(tiny_dir / "sd")
    with SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, tiny_config()) as ext:
        yield ext


def images(n=2, seed=2):
    size = tiny_config().image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@contextmanager
def started(modules):
    """How many times each of ``modules`` (name -> module) started running (a pre-hook: a pass stopped inside
    a module still counts it)."""
    counts = dict.fromkeys(modules, 0)
    hooks = [m.register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)) for name, m in modules.items()]
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def after_the_last_recorded_layer(unet):
    """What runs in SD's up block 2 after its last self-attention layer: that transformer block's feed-forward
    and the block's upsampler (nothing reads their outputs)."""
    block = unet.up_blocks[2]
    return {"last feed-forward": block.attentions[-1].transformer_blocks[-1].ff, "upsampler": block.upsamplers[0]}


def assert_same_features(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a.up_features, b.up_features))
    assert (a.attention is None) == (b.attention is None)
    if a.attention is not None:
        assert a.attention.keys() == b.attention.keys() and all(torch.equal(a.attention[r], b.attention[r]) for r in a.attention)


def test_the_stop_is_read_off_the_unet_layout_before_any_pass(fresh):
    assert unet_layout(fresh.unet) == SD_LAYOUT
    # 128 px: latent 16, maps at 4 and 8 tokens a side (levels 2 and 1): 5 layers each, the last in up block 2
    assert fresh.stops == {False: PassStop(None, 1), True: PassStop(10, None)}


def test_the_stop_never_loses_a_feature():
    """After the last recorded layer when it runs after up block 1's output; else at that output."""
    assert plan_stops(SD_LAYOUT, {1, 2}) == {False: PassStop(None, 1), True: PassStop(10, None)}
    assert plan_stops(SD_LAYOUT, {0}) == {False: PassStop(None, 1), True: PassStop(5, None)}
    assert plan_stops(SD_LAYOUT, {2}) == {False: PassStop(None, 1), True: PassStop(None, 1)}  # last one in up block 1
    assert plan_stops(SD_LAYOUT, {3}) == {False: PassStop(None, 1), True: PassStop(None, 1)}  # in the mid block
    assert plan_stops([], {1, 2}) == {False: PassStop(None, 1), True: PassStop(None, 1)}


def test_every_pass_stops_right_after_the_last_recorded_layer_the_first_included(fresh, monkeypatch):
    """The first pass after a Load, and every later one, stops where the layout says, with the features and maps
    of a pass over the whole UNet, bit for bit."""
    recorded = []
    inner = fresh.self_attention
    monkeypatch.setattr(fresh, "self_attention", lambda q, *a: recorded.append(q.shape[1]) or inner(q, *a))
    x = images()
    copies = x.shape[0] * fresh.config.ensemble_size
    with started(after_the_last_recorded_layer(fresh.unet)) as counts:
        first = fresh(x, seed=1)
        assert counts == {"last feed-forward": 0, "upsampler": 0}
        assert len(recorded) == 10 and recorded[-1] == 8 * 8  # the layers of one pass over all copies, the last at 8x8
        second = fresh(x, seed=1)
        assert counts == {"last feed-forward": 0, "upsampler": 0} and len(recorded) == 20
        monkeypatch.setattr(fresh, "stops", WHOLE_UNET)
        whole = fresh(x, seed=1)
        assert counts == {"last feed-forward": 1, "upsampler": 1}  # the counters do see those modules run
    assert copies == 4
    assert_same_features(first, whole)
    assert_same_features(second, whole)


def test_a_reference_encoded_first_does_not_switch_the_stop_off(tiny_dir):
    """The bug this guards against only cost time: after a reference's pass (which ends at up block 1's output)
    the target passes ran the whole UNet. Only counting what runs in a stopped pass can see it."""
    sd = load_sd_components(tiny_dir / "sd")
    pipe = IconMattingPipeline(build_model(sd, tiny_head()))
    try:
        modules = {"up block 2": sd.unet.up_blocks[2], **after_the_last_recorded_layer(sd.unet)}
        image, mask = make_reference()
        with started(modules) as counts:
            context = pipe.encode_reference(image, mask)
            assert counts == {"up block 2": 0, "last feed-forward": 0, "upsampler": 0}
            pipe.matte(context, make_targets(2), chunk_size=1)
            assert counts == {"up block 2": 2, "last feed-forward": 0, "upsampler": 0}
            pipe.matte(pipe.encode_reference(image, mask), make_targets(1))
            assert counts == {"up block 2": 3, "last feed-forward": 0, "upsampler": 0}
    finally:
        pipe.model.close()


@pytest.mark.parametrize("where", ["unet", "transformer block"])
@pytest.mark.parametrize("kind", ["fallback", "own error"])
def test_a_wrapper_with_except_exception_around_the_unet_lets_the_stop_through(fresh, where, kind):
    """Other extensions wrap the UNet (or a block of it) with a catch-all ``except Exception``: a fallback that
    runs the wrapped call again, or a re-raise as their own error. The stop passes through both: the same
    features, no error, the fallback never runs, and the pass still ends where it should."""
    x = images()
    plain = fresh(x, seed=3)
    module = fresh.unet if where == "unet" else fresh.unet.up_blocks[2].attentions[-1].transformer_blocks[-1]
    original, fallbacks = module.forward, []

    def wrapped(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            fallbacks.append(type(exc).__name__)
            if kind == "own error":
                raise RuntimeError("another extension's UNet wrapper failed") from exc
            return original(*args, **kwargs)

    module.forward = wrapped
    try:
        with started(after_the_last_recorded_layer(fresh.unet)) as counts:
            wrapped_features = fresh(x, seed=3)
            reference = fresh(x, seed=3, with_attention=False)
    finally:
        del module.forward
    assert fallbacks == []
    assert counts == {"last feed-forward": 0, "upsampler": 0}
    assert_same_features(wrapped_features, plain)
    assert torch.equal(reference.up_features[1], fresh(x, seed=3, with_attention=False).up_features[1])


def test_recording_attention_leaves_unet_output_unchanged(fresh, monkeypatch):
    """Recorded layers compute their output from the recorded float32 probabilities (one attention
    computation per layer): over the whole UNet, its output equals diffusers' own attention to float rounding."""
    unet = fresh.unet
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = fresh.empty_prompt_embedding.expand(2, -1, -1)
    plain = unet(latents, 200, encoder_hidden_states=cond).sample  # outside a pass the extractor's hooks do nothing
    outputs = []
    hook = unet.conv_out.register_forward_hook(lambda m, i, out: outputs.append(out))  # the UNet's last layer
    monkeypatch.setattr(fresh, "stops", WHOLE_UNET)
    fresh.recorder.reset(2, 1)
    try:
        fresh.unet_up_features(latents, cond, True)
        maps, layers = fresh.recorder.maps(), dict(fresh.recorder.layers)
    finally:
        hook.remove()
        fresh.recorder.reset(0, 1)
    (recorded,) = outputs
    assert (plain - recorded).abs().max() <= 1e-5 * max(1.0, plain.abs().max().item())
    assert layers == {r: 5 for r in fresh.config.attention_resolutions}  # SD's 2 down + 3 up blocks each
    for r, m in maps.items():
        assert m.shape == (2, r * r, r * r)
        assert torch.allclose(m.sum(-1), torch.ones(2, r * r), atol=1e-5)  # rows are probabilities


def test_a_pass_whose_recorded_layers_all_run_before_up_block_1s_output_stops_there(fresh, monkeypatch):
    """With the maps at S/32 only (down block 2, up block 1), the pass stops at up block 1's output, not at the
    last recorded layer (which would lose that output): the features and maps of the whole UNet."""
    side = fresh.config.attention_resolutions[0]
    monkeypatch.setattr(fresh.recorder, "token_counts", {side * side: side})
    monkeypatch.setattr(fresh, "stops", plan_stops(unet_layout(fresh.unet), {2}))
    assert fresh.stops[True] == PassStop(None, 1)
    x = images(1)
    with started({"up block 2": fresh.unet.up_blocks[2]}) as counts:
        stopped = fresh(x, seed=0)
        assert counts == {"up block 2": 0}
    monkeypatch.setattr(fresh, "stops", WHOLE_UNET)
    assert_same_features(stopped, fresh(x, seed=0))
    assert set(stopped.attention) == {side}
