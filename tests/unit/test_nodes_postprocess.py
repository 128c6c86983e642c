"""The nodes' math in postprocess (compositing, cover-crop, pairing, previews, the unpainted mask),
checked against pixels computed by hand."""
import pytest
import torch

from iconmatting_core.postprocess import (composite_over, cover_crop, is_unpainted_mask, pair_backgrounds,
                                          similarity_preview)

RED, BLUE = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]


def solid(h, w, rgb):
    return torch.tensor(rgb).expand(h, w, 3).clone()


def test_composite_weights_the_cut_out_by_alpha_and_the_background_by_one_minus_alpha():
    rgba = torch.zeros(1, 3, 4)
    rgba[..., :3] = torch.tensor(RED)
    rgba[0, :, 3] = torch.tensor([0.25, 1.0, 0.0])
    out = composite_over(rgba, solid(1, 3, BLUE))
    expected = torch.tensor([[[0.25, 0.0, 0.75], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_composite_clamps_and_ignores_a_background_alpha_channel():
    rgba = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    background = torch.tensor([[[1.0, 2.0, 0.0, 0.3]]])  # RGBA background, a value over 1
    assert torch.allclose(composite_over(rgba, background), torch.tensor([[[0.75, 1.0, 0.25]]]))


def test_cover_crop_keeps_the_centre_of_a_wider_background_undistorted():
    background = torch.arange(8.0).view(2, 4, 1).expand(2, 4, 3)  # columns 0..3 in rows 0 and 1, times 4
    out = cover_crop(background, 2, 2)  # same height: no resize, the two middle columns
    assert torch.equal(out[..., 0], torch.tensor([[1.0, 2.0], [5.0, 6.0]]))


def test_cover_crop_scales_up_to_cover_then_crops_the_centre():
    a, b = 0.2, 0.6
    background = torch.tensor([[[a] * 3, [b] * 3]])  # 1 x 2
    out = cover_crop(background, 2, 2)  # scale 2 -> 2 x 4 (bilinear, half-pixel centres), columns 1 and 2
    row = torch.tensor([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b])
    assert out.shape == (2, 2, 3)
    assert torch.allclose(out[..., 0], row.expand(2, 2), atol=1e-6)


def test_cover_crop_scales_both_sides_by_the_same_factor():
    a, b = 0.2, 0.6
    background = torch.tensor([[a] * 3, [b] * 3]).view(2, 1, 3).expand(2, 2, 3)  # 2 x 2: rows a, b
    out = cover_crop(background, 2, 4)  # scale 2 (for the width) -> 4 x 4, rows 1 and 2
    rows = torch.tensor([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b])
    assert torch.allclose(out[..., 0], rows[:, None].expand(2, 4), atol=1e-6)


def test_cover_crop_of_a_taller_background_crops_rows():
    background = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3)  # 4 x 2, rows 0..3
    assert torch.equal(cover_crop(background, 2, 2)[..., 0], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


def test_composite_output_has_the_cut_out_size_and_the_background_covers_it():
    rgba = torch.zeros(2, 2, 4)  # fully transparent: the output is the cropped background
    background = torch.arange(8.0).view(2, 4, 1).expand(2, 4, 3) / 10
    assert torch.allclose(composite_over(rgba, background)[..., 0], torch.tensor([[0.1, 0.2], [0.5, 0.6]]))


def test_backgrounds_pair_one_for_all_one_over_all_or_one_each():
    assert pair_backgrounds(3, 1) == [(0, 0), (1, 0), (2, 0)]
    assert pair_backgrounds(1, 4) == [(0, 0), (0, 1), (0, 2), (0, 3)]  # a product over 4 backgrounds
    assert pair_backgrounds(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert pair_backgrounds(1, 1) == [(0, 0)]
    for cutouts, backgrounds in ((3, 2), (2, 3)):
        with pytest.raises(ValueError) as info:
            pair_backgrounds(cutouts, backgrounds)
        assert str(info.value) == (f"Got {cutouts} cut-outs and {backgrounds} backgrounds. Give 1 background for all "
                                   "cut-outs, 1 cut-out for all backgrounds, or one background per cut-out (in order).")
    with pytest.raises(ValueError, match=r"^Got 0 cut-outs and 2 backgrounds\. Connect at least one of each\.$"):
        pair_backgrounds(0, 2)


def test_preview_blends_the_image_with_the_min_max_normalised_heat_map():
    image = torch.full((1, 3, 3), 0.5)
    similarity = torch.tensor([[10.0, 11.0, 12.0]])  # normalised: 0, 0.5, 1
    heat = torch.tensor([[0.0, 0.0, 0.3], [0.2, 1.0, 0.8], [1.0, 0.0, 0.0]])  # the ramp's stops 0, 2 and 4
    assert torch.allclose(similarity_preview(image, similarity), 0.4 * 0.5 + 0.6 * heat[None], atol=1e-6)


def test_preview_uses_only_the_colour_channels_and_a_flat_map_is_the_ramps_start():
    image = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # RGBA
    out = similarity_preview(image, torch.tensor([[3.0]]))
    assert torch.allclose(out, torch.tensor([[[0.4, 0.0, 0.18]]]), atol=1e-6)


@pytest.mark.parametrize("mask_hw, image_hw, painted, expected", [
    ((64, 64), (96, 128), False, True),  # Load Image's placeholder for a photo without mask
    ((64, 64), (64, 64), False, False),  # a 64x64 photo with a genuinely empty mask: not the placeholder
    ((64, 64), (96, 128), True, False),
    ((96, 128), (96, 128), False, False),
])
def test_the_unpainted_mask_is_the_empty_64x64_placeholder(mask_hw, image_hw, painted, expected):
    mask = torch.zeros(1, *mask_hw)
    if painted:
        mask[0, 3, 5] = 1
    assert is_unpainted_mask(mask, image_hw) is expected
    assert is_unpainted_mask(mask[0], image_hw) is expected


def test_a_3d_tensor_is_a_mask_batch_only_when_the_caller_says_masks():
    from iconmatting_core.preprocess import split_batch

    t = torch.zeros(2, 5, 6)
    assert len(split_batch(t, "the reference's masks", masks=True)) == 2  # the label's wording decides nothing
    assert len(split_batch(t, "masks")) == 1  # images: one HxWxC image
    assert len(split_batch(torch.zeros(5, 6, 1), "masks", masks=True)) == 1  # an HxWx1 mask


def test_head_weights_with_nan_are_a_broken_file_not_an_overflow(tmp_path):
    from safetensors.torch import load_file, save_file

    from iconmatting_core.checkpoint import CheckpointError, read_head_weights
    from tiny_models import save_tiny_head

    path = tmp_path / "head.safetensors"
    save_tiny_head(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 1)
    tensors[key][0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"is broken: 1 of its tensors hold NaN/inf values .*Download"):
        read_head_weights(path)


def test_nan_out_of_the_head_blames_overflow_only_in_half_precision():
    from iconmatting_core.pipeline import _check_finite

    bad = torch.tensor([float("nan")])
    with pytest.raises(FloatingPointError, match="gave NaN/inf in float32: the weights hold broken values"):
        _check_finite(bad, "alpha")
    with pytest.raises(FloatingPointError, match=r"overflowed in torch.float16 .*fp32 or bf16"):
        _check_finite(bad.half(), "alpha")
    _check_finite(torch.ones(2), "alpha")
