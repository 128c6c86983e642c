"""The ensemble copies in smaller UNet passes (what a host short of memory asks for) give the same features,
attention maps and alpha as one pass over all of them, to float rounding."""
import torch

from tiny_models import tiny_pipeline


def _run(pipe, group, passes):
    ext = pipe.model.extractor
    ext.max_copies_per_pass = group
    inner = ext.unet_up_features
    ext.unet_up_features = lambda latents, *a: passes.append(latents.shape[0]) or inner(latents, *a)
    try:
        gen = torch.Generator().manual_seed(3)
        images = torch.rand(2, 3, pipe.config.image_size, pipe.config.image_size, generator=gen) * 2 - 1
        feats = ext(images, seed=7)
        ref = torch.rand(40, 56, 3, generator=gen)
        mask = torch.zeros(40, 56)
        mask[8:30, 10:40] = 1
        targets = [torch.rand(36, 48, 3, generator=gen), torch.rand(50, 30, 3, generator=gen)]
        alphas = pipe.matte(pipe.encode_reference(ref, mask, seed=2), targets)
        return feats, alphas
    finally:
        del ext.unet_up_features
        ext.max_copies_per_pass = None


def test_copies_in_groups_give_the_same_features_and_alpha(tmp_path):
    pipe = tiny_pipeline(tmp_path, seed=1)
    copies = 2 * pipe.config.ensemble_size
    whole_passes, group_passes = [], []
    whole, whole_alpha = _run(pipe, None, whole_passes)
    grouped, group_alpha = _run(pipe, 3, group_passes)  # groups of 3 split the first image's copies from the second's
    assert whole_passes[0] == copies and group_passes[:2] == [3, copies - 3]
    for a, b in zip(whole.up_features, grouped.up_features):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))
    for r in whole.attention:
        assert (whole.attention[r] - grouped.attention[r]).abs().max() <= 1e-6
        # rows stay probabilities: each image's maps are its own copies' mean, none lost or counted twice
        assert torch.allclose(grouped.attention[r].sum(-1), torch.ones_like(grouped.attention[r][..., 0]), atol=1e-5)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(whole_alpha, group_alpha))
