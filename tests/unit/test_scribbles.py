"""Reference cells are picked from the original-resolution mask: thin strokes and clicks survive."""
import pytest
import torch
import torch.nn.functional as F

from iconmatting_core import preprocess as pre
from iconmatting_core.context import cell_selection
from oracles import cell_mask, prepare_mask


def centre_cells(points, placement, size, grid):
    """Oracle: the cell holding each original pixel's centre, mapped to the model input."""
    stride = size // grid
    out = torch.zeros(grid, grid, dtype=torch.bool)
    for y, x in points:
        my = (y + 0.5) * placement.content_height / placement.height
        mx = (x + 0.5) * placement.content_width / placement.width
        out[int(my // stride), int(mx // stride)] = True
    return out


def dilate(cells):
    return F.max_pool2d(cells[None, None].float(), 3, 1, 1)[0, 0] > 0


def check_touched(mask, points, size=768, grid=48):
    p = pre.placement_for(mask.shape[0], mask.shape[1], size, "pad")
    selected = cell_selection(mask, p, size, grid, "scribble")
    want = centre_cells(points, p, size, grid)
    assert (selected & want).equal(want)  # every touched cell
    assert not (selected & ~dilate(want)).any()  # and only cells next to the stroke (pixel on a border: both)
    # the old path (mask shrunk to the input, binarised) loses the stroke entirely
    assert not cell_mask(prepare_mask(mask, p, size), grid, "scribble").any()
    return selected


def test_one_pixel_stroke_on_a_4000x3000_photo():
    h, w = 3000, 4000
    mask = torch.zeros(h, w)
    mask[1234, 700:3300] = 1  # horizontal, 1 px
    mask[200:2900, 3777] = 1  # vertical, 1 px
    points = [(1234, x) for x in range(700, 3300)] + [(y, 3777) for y in range(200, 2900)]
    selected = check_touched(mask, points)
    assert int(selected.sum()) >= 40


def test_single_click_on_a_1080p_image():
    mask = torch.zeros(1080, 1920)
    mask[611, 1403] = 1
    selected = check_touched(mask, [(611, 1403)])
    assert int(selected.sum()) == 1


def test_single_pixel_on_a_cell_border_selects_both_cells():
    # 1000 x 1000 -> 768: pixel row 20 spans model rows [15.36, 16.13): cells 0 and 1;
    # pixel column 500 spans [384, 384.77): cell 24 only
    mask = torch.zeros(1000, 1000)
    mask[20, 500] = 1
    p = pre.placement_for(1000, 1000, 768, "pad")
    selected = cell_selection(mask, p, 768, 48, "scribble")
    assert selected.nonzero().tolist() == [[0, 24], [1, 24]]


@pytest.mark.parametrize("mode", ["pad", "stretch"])
@pytest.mark.parametrize("pooling", ["mask", "scribble"])
def test_filled_masks_at_the_input_size_select_exactly_as_before(mode, pooling):
    g = torch.Generator().manual_seed(7)
    for seed in range(4):
        noise = torch.rand(1, 1, 12, 12, generator=g)
        soft = F.interpolate(noise, size=(768, 768), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)
        mask = soft if seed % 2 else (soft > 0.5).float()
        p = pre.placement_for(768, 768, 768, mode)
        old = cell_mask(prepare_mask(mask, p, 768), 48, pooling)
        new = cell_selection(mask, p, 768, 48, pooling)
        assert old.any() and torch.equal(new, old)


def test_filled_mask_pooling_needs_full_cover_at_the_original_resolution():
    mask = torch.zeros(3000, 4000)
    mask[1000:2000, 1000:3000] = 1
    p = pre.placement_for(3000, 4000, 768, "pad")  # content 576 x 768, scale 0.192
    selected = cell_selection(mask, p, 768, 48, "mask")
    rows = selected.any(1).nonzero().flatten()
    cols = selected.any(0).nonzero().flatten()
    # model rows 192..384, cols 192..576: cells 12..23 and 12..35, all fully covered
    assert rows.tolist() == list(range(12, 24)) and cols.tolist() == list(range(12, 36))
    assert int(selected.sum()) == 12 * 24
    mask[1500, 1500] = 0  # one hole removes exactly the cell holding it
    assert int(cell_selection(mask, p, 768, 48, "mask").sum()) == 12 * 24 - 1


def test_thin_stroke_with_mask_guidance_suggests_scribble(pipe):
    image = torch.rand(700, 1000, 3, generator=torch.Generator().manual_seed(1))
    stroke = torch.zeros(700, 1000)
    stroke[350, 100:900] = 1  # 1 px on a photo 7.8x larger than the tiny model's 128 px input
    with pytest.raises(ValueError, match=r"selects no 16x16-pixel cell .*\(guidance 'mask'\).*use guidance 'scribble'") as err:
        pipe.encode_reference(image, stroke)
    assert "pooling" not in str(err.value)
    ctx = pipe.encode_reference(image, stroke, pooling="scribble")
    assert ctx.tokens.shape[0] == 8  # the stroke crosses the image's 8 columns of cells
    click = torch.zeros(700, 1000)
    click[10, 990] = 1
    assert pipe.encode_reference(image, click, pooling="scribble").tokens.shape[0] == 1
