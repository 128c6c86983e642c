"""Stage 1 by hand-computed pixels: the letterbox's size and mid-grey padding, what input values mean
(uint8 / 255, float images refused past 2, masks), and maps brought back to the original pixels."""
import numpy as np
import pytest
import torch

from iconmatting_core.preprocess import (Placement, content_cells, placement_for, prepare_image, restore_alpha,
                                         restore_map, split_batch, to_mask, to_rgb)


def test_letterbox_pads_with_sd_mid_grey_at_the_right_and_bottom():
    """A white 2x4 image into 8x8: scaled x2 to 4x8 at the top; the 4 rows below are mid-grey, 0 in SD's [-1, 1]."""
    x, placement = prepare_image(torch.ones(2, 4, 3), 8, "pad")
    assert placement == Placement(2, 4, 4, 8)
    assert bool((x[:, :4] == 1).all()) and bool((x[:, 4:] == 0).all())


def test_letterbox_size_rounds_to_the_nearest_pixel():
    """7x3 into 16: scale 16/7, width 3 * 16 / 7 = 6.86 -> 7 (not 6); the long side fills the square."""
    assert placement_for(7, 3, 16, "pad") == Placement(7, 3, 16, 7)
    assert placement_for(3, 7, 16, "pad") == Placement(3, 7, 7, 16)
    assert placement_for(3, 7, 16, "stretch") == Placement(3, 7, 16, 16)


def test_a_float_image_of_0_255_values_is_refused_not_matted_as_white():
    with pytest.raises(ValueError, match=r"float image with values up to 200; float images must be in \[0, 1\]"):
        to_rgb(np.full((2, 2, 3), 200.0, np.float32))
    assert to_rgb(np.full((2, 2, 3), 1.5, np.float32)).max() == 1.0  # resampling overshoot: clamped


def test_image_values_uint8_over_255_and_rgba_drops_alpha():
    rgba = np.array([[[255, 51, 0, 7]]], np.uint8)
    assert to_rgb(rgba).numpy() == pytest.approx(np.array([[[1.0, 0.2, 0.0]]]))
    assert to_rgb(np.array([[102]], np.uint8)).numpy() == pytest.approx(np.full((1, 1, 3), 0.4))


def test_mask_values_uint8_over_255_floats_clamped():
    assert to_mask(np.array([[0, 51, 255]], np.uint8)).numpy() == pytest.approx(np.array([[0.0, 0.2, 1.0]]))
    assert to_mask(np.array([[-0.5, 0.25, 3.0]], np.float32)).tolist() == [[0.0, 0.25, 1.0]]


def test_a_3d_array_is_one_image_but_a_batch_of_masks():
    assert len(split_batch(np.zeros((4, 5, 3), np.float32), "images")) == 1
    assert len(split_batch(np.zeros((4, 5, 3), np.float32), "masks", masks=True)) == 4
    assert len(split_batch(np.zeros((4, 5, 1), np.float32), "masks", masks=True)) == 1


def test_a_partly_padded_edge_cell_holds_image():
    """Content 5 rows x 3 columns of a 16 square, 4x4 grid of 4-pixel cells: rows 0-1 and column 0 hold image."""
    cells = content_cells(Placement(10, 6, 5, 3), 16, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :1] = True
    assert torch.equal(cells, expected)


def test_alpha_of_a_tall_image_comes_back_from_its_own_rows_and_columns():
    """A 4x2 image letterboxed into 4x4 (content 4 rows x 2 columns): the alpha's column c of the content
    comes back as column c of the image; the padding columns 2-3 never do."""
    alpha = torch.tensor([[[0.1, 0.9, 0.5, 0.5]] * 4])  # [1, 4, 4]: content columns 0.1 / 0.9
    back = restore_alpha(alpha, Placement(4, 2, 4, 2))
    assert back.numpy() == pytest.approx(np.array([[0.1, 0.9]] * 4))


def test_a_map_is_brought_back_by_pixel_centres():
    """A 1x2 map [0, 1] over a 2x2 stretched square, back to a 1x4 image: pixel centres at 1/8, 3/8, 5/8, 7/8
    of the map's width sample it at 0, 0.25, 0.75, 1 (half-pixel, not corner, alignment)."""
    x = torch.tensor([[[0.0, 1.0]]])
    assert restore_map(x, Placement(1, 4, 2, 2), 2)[0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_shrinking_one_side_only_is_antialiased():
    """8x8 stripes (odd columns 1) shrunk to 8x2: output column 0 is a triangle filter 4 pixels wide each side
    centred at input 1.5, weights 1 - |x - 1.5| / 4 at columns 0-5 (0.625 0.875 0.875 0.625 0.375 0.125, sum
    3.5), so (0.875 + 0.625 + 0.125) / 3.5 = 13/28, and column 1 by symmetry 15/28. Plain bilinear would
    sample between two columns: 0.5."""
    from iconmatting_core.preprocess import _resize

    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., 1::2] = 1.0
    out = _resize(stripes, (8, 2), "bilinear")
    assert out[0, 0].numpy() == pytest.approx(np.tile([13 / 28, 15 / 28], (8, 1)), abs=1e-5)
