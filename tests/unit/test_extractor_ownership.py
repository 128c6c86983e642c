"""SDFeatureExtractor borrows the caller's UNet and VAE and gives them back as it found them."""
import torch

from iconmatting_core.sd_features import SDFeatureExtractor
from iconmatting_core.sd_loading import load_sd_components
from tiny_models import tiny_config


def snapshot(unet, vae):
    """Everything an extractor could change, read independently of its bookkeeping."""
    return {
        "processors": {name: proc for name, proc in unet.attn_processors.items()},
        "hooks": [len(b._forward_hooks) for b in unet.up_blocks],
        "grad": [p.requires_grad for p in (*unet.parameters(), *vae.parameters())],
        "training": [m.training for m in (*unet.modules(), *vae.modules())],
        "decoder": vae.decoder,
    }


@torch.no_grad()
def test_two_extractors_over_one_unet_and_the_unet_restored_after_close(tiny_dir):
    sd = load_sd_components(tiny_dir / "sd")
    unet, vae = sd.unet, sd.vae
    unet.train(), vae.train()  # a caller's modules in training mode, with gradients on
    before = snapshot(unet, vae)
    assert all(before["grad"]) and all(before["training"]) and before["decoder"] is not None
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = sd.empty_prompt_embedding.expand(1, -1, -1)
    unet.eval()
    plain = unet(latents, 200, encoder_hidden_states=cond).sample
    unet.train()

    cfg = tiny_config()
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    first = SDFeatureExtractor(unet, vae, sd.empty_prompt_embedding, cfg)
    alone = first(images, seed=3)
    second = SDFeatureExtractor(unet, vae, sd.empty_prompt_embedding, cfg)
    assert vae.decoder is before["decoder"]  # the VAE is used as given
    for ext in (first, second):  # each records its own maps, once per layer, with the other's wrappers around
        feats = ext(images, seed=3)
        for a, b in zip(feats.up_features, alone.up_features):
            assert torch.equal(a, b)
        for r in cfg.attention_resolutions:
            assert torch.equal(feats.attention[r], alone.attention[r])
    first.close()  # closed in the order opened: the second's wrappers stay, around the originals
    feats = second(images, seed=3)
    assert torch.equal(feats.attention[cfg.attention_resolutions[0]], alone.attention[cfg.attention_resolutions[0]])
    with torch.no_grad():
        try:
            first(images)
        except RuntimeError as exc:
            assert "closed" in str(exc)
        else:
            raise AssertionError("a closed extractor ran")
    with second:
        pass
    after = snapshot(unet, vae)
    assert after["processors"] == before["processors"]  # the very same processor objects
    assert after["hooks"] == before["hooks"] and after["grad"] == before["grad"]
    assert after["training"] == before["training"] and after["decoder"] is before["decoder"]
    unet.eval()
    assert torch.equal(unet(latents, 200, encoder_hidden_states=cond).sample, plain)


def test_closing_the_first_of_two_keeps_the_second_working_and_either_order_restores(tiny_dir):
    sd = load_sd_components(tiny_dir / "sd")
    before = dict(sd.unet.attn_processors)
    cfg = tiny_config()
    a = SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, cfg)
    b = SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, cfg)
    b.close()  # the outer one first
    assert all(type(p).__name__ == "_RecordingAttnProcessor" and p.inner is before[n]
               for n, p in sd.unet.attn_processors.items() if n.endswith("attn1.processor"))
    a.close()
    a.close()  # twice is harmless
    assert dict(sd.unet.attn_processors) == before
    assert all(len(block._forward_hooks) == 0 for block in sd.unet.up_blocks)


def test_an_unclosed_extractor_does_not_keep_the_unet_alive(tiny_dir):
    import gc
    import weakref

    from iconmatting_core import sd_features

    sd = load_sd_components(tiny_dir / "sd")
    ext = SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, tiny_config())
    alive = weakref.ref(sd.unet)
    del ext, sd
    gc.collect()
    assert alive() is None and alive not in list(sd_features._BORROWED.keys())


@torch.no_grad()
def test_an_extractor_sent_to_another_process_still_records_its_features(tiny_dir):
    """A pipeline pickled for a worker (Ray sends the test's pipelines this way) keeps its hooks."""
    import pickle

    sd = load_sd_components(tiny_dir / "sd")
    cfg = tiny_config()
    ext = SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, cfg)
    images = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    here = ext(images, seed=3)
    there = pickle.loads(pickle.dumps(ext))(images, seed=3)
    for a, b in zip(here.up_features, there.up_features):
        assert torch.equal(a, b)
    for r in cfg.attention_resolutions:
        assert torch.equal(here.attention[r], there.attention[r])
