"""The training data reader: which files are data, how mattes are read, the derived unknown band.

Expected values are literal file names, hand-computed pixel values (32768 / 65535) and band widths
worked out from the edge position and the documented radius (10 model pixels at 768, scaled).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from iconmatting_core.eval import DatasetError, read_matte
from iconmatting_core.training.data import TrainSamples, _read, load_train_data
from train_helpers import make_groups

MID_GREY_16 = 32768  # a 16-bit mid-grey: 32768 / 65535 = 0.50000763, but 128.5 if read as 8-bit (/255)


def _save16(path, value, size=(40, 30)):
    Image.fromarray(np.full(size[::-1], value, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit file


def test_upper_case_extensions_are_images(tmp_path):
    data = make_groups(tmp_path / "d", 1, 2)
    shutil.move(data / "g0" / "images" / "1.png", data / "g0" / "images" / "IMG_0001.PNG")
    Image.open(data / "g0" / "images" / "0.png").convert("RGB").save(data / "g0" / "images" / "IMG_0002.JPG")
    shutil.move(data / "g0" / "alphas" / "1.png", data / "g0" / "alphas" / "IMG_0001.PNG")
    shutil.copy(data / "g0" / "alphas" / "0.png", data / "g0" / "alphas" / "IMG_0002.Png")
    loaded = load_train_data(data)
    assert [i.name for i in loaded.items] == ["0", "IMG_0001", "IMG_0002"]
    assert loaded.items[2].image.name == "IMG_0002.JPG"


def test_hidden_folders_and_files_are_not_data(tmp_path):
    data = make_groups(tmp_path / "d", 2, 2)
    hidden = make_groups(tmp_path / "h", 1, 1)
    shutil.copytree(hidden / "g0", data / ".cache")  # a complete group, but hidden (a tool's cache)
    (data / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "g0" / "images" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS's resource fork
    (data / "g0" / "alphas" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    lines = []
    loaded = load_train_data(data, log=lines.append)
    assert sorted(loaded.groups) == ["g0", "g1"] and len(loaded) == 4
    assert lines == [] and loaded.skipped == []


def test_a_folder_of_only_hidden_groups_is_not_a_training_folder(tmp_path):
    data = tmp_path / "d"
    shutil.copytree(make_groups(tmp_path / "h", 1, 1) / "g0", data / ".cache")
    with pytest.raises(DatasetError, match="not a training data folder"):
        load_train_data(data)


def test_16_bit_mid_grey_matte_is_half_in_training_and_evaluation(tmp_path):
    _save16(tmp_path / "a.png", MID_GREY_16)
    expected = MID_GREY_16 / 65535
    assert np.asarray(_read(tmp_path / "a.png", "F")) == pytest.approx(expected, abs=1e-7)
    assert read_matte(tmp_path / "a.png") == pytest.approx(expected, abs=1e-7)


def test_16_bit_soft_alpha_stays_soft_in_a_training_sample(tmp_path):
    data = make_groups(tmp_path / "d", 1, 1, size=(30, 40))
    _save16(data / "g0" / "alphas" / "0.png", MID_GREY_16)
    s = TrainSamples(load_train_data(data), 128, 42)[0]
    assert torch.allclose(s["alpha"], torch.full_like(s["alpha"], MID_GREY_16 / 65535), atol=1e-6)
    assert bool(s["unknown"].all())  # soft everywhere: all unknown (a value read as 128.5 clips to 1: known)
    assert bool((s["guidance"] == 1).all())  # the reference (itself) > 0.5


@pytest.mark.parametrize("alpha_size", [(100, 81), (99, 80)])
def test_alpha_of_another_height_or_width_is_refused(tmp_path, alpha_size):
    data = make_groups(tmp_path / "d", 1, 2, size=(80, 100))  # images 100 wide, 80 high
    Image.new("L", alpha_size).save(data / "g0" / "alphas" / "1.png")
    with pytest.raises(DatasetError, match=f"is {alpha_size[0]}x{alpha_size[1]} but its image .* is 100x80"):
        load_train_data(data)


def _edge_data(root, side=96):
    """One square image whose alpha is a hard vertical edge in the middle (0 left, 1 right)."""
    a = np.zeros((side, side), np.uint8)
    a[:, side // 2:] = 255
    for sub, arr in (("images", np.zeros((side, side, 3), np.uint8)), ("alphas", a)):
        (root / "g" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "g" / sub / "0.png")
    return load_train_data(root)


@pytest.mark.parametrize("size, band", [(128, range(62, 66)), (384, range(187, 197)), (768, range(374, 394))])
def test_derived_band_scales_with_the_model_size(tmp_path, size, band):
    """Radius 10 at 768 scaled: 2 at 128 (10 x 128 / 768 = 1.67), 5 at 384, 10 at 768; the edge lies
    between columns size/2 - 1 and size/2, so the band spans radius columns on each side."""
    unknown = TrainSamples(_edge_data(tmp_path / "d"), size, 42)[0]["unknown"][0]
    expected = torch.zeros(size, size)
    expected[:, band.start:band.stop] = 1
    assert torch.equal(unknown, expected)


def test_an_explicit_band_radius_is_model_pixels(tmp_path):
    unknown = TrainSamples(_edge_data(tmp_path / "d"), 384, 42, radius=3)[0]["unknown"][0]
    assert unknown[0].nonzero().flatten().tolist() == list(range(189, 195))


def test_data_digest_follows_content_not_names(tmp_path):
    a = load_train_data(make_groups(tmp_path / "a", 2, 2))
    b = load_train_data(shutil.copytree(tmp_path / "a", tmp_path / "renamed"))
    assert a.digest() == b.digest() and a.summary()["digest"] == a.digest()
    img = np.asarray(Image.open(tmp_path / "renamed" / "g1" / "alphas" / "0.png")).copy()
    img[0, 0] ^= 1  # one pixel of one alpha
    Image.fromarray(img).save(tmp_path / "renamed" / "g1" / "alphas" / "0.png")
    assert load_train_data(tmp_path / "renamed").digest() != a.digest()
    shutil.move(tmp_path / "a" / "g1", tmp_path / "a" / "g2")  # the same files in another group
    assert load_train_data(tmp_path / "a").digest() != a.digest()


def test_positions_split_over_processes_as_one_process_takes_them():
    """Step s of rank r of W processes, B samples each: positions (s*W + r)*B ... + B - 1; together
    the ranks take exactly the positions one process with the global batch W*B takes."""
    from iconmatting_core.training.data import StepSampler

    assert list(StepSampler(0, 2, 4)) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert list(StepSampler(0, 2, 2, rank=0, world=2)) == [0, 1, 4, 5]
    assert list(StepSampler(0, 2, 2, rank=1, world=2)) == [2, 3, 6, 7]
    assert list(StepSampler(1, 3, 2, rank=1, world=2)) == [6, 7, 10, 11]  # resumed at step 1
    assert len(StepSampler(1, 3, 2, rank=1, world=2)) == 4


def test_every_epoch_takes_every_image_once_in_a_new_order(tmp_path):
    samples = TrainSamples(load_train_data(make_groups(tmp_path / "d", 2, 4)), 128, 42)
    epochs = [[samples.target_index(p) for p in range(e * 8, e * 8 + 8)] for e in range(3)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert TrainSamples(samples.data, 128, 42).target_index(13) == epochs[1][5]  # the same from any start


def test_guidance_is_the_references_mask_not_the_targets(tmp_path):
    """A group of three whose alphas are the left, middle and right third: each sample's guidance
    covers its reference's third (never the target itself: more than two images)."""
    side = 96
    for k in range(3):
        a = np.zeros((side, side), np.uint8)
        a[:, k * 32:(k + 1) * 32] = 255
        for sub, arr in (("images", np.full((side, side, 3), 60 * k, np.uint8)), ("alphas", a)):
            (tmp_path / "d" / "g" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "d" / "g" / sub / f"{k}.png")
    samples = TrainSamples(load_train_data(tmp_path / "d"), 192, 42)
    seen = set()
    for p in range(12):
        s = samples[p]
        target = samples.target_index(p)
        third = int(s["guidance"].mean(dim=0).argmax()) // 64  # the columns the guidance covers
        assert third != target and bool((s["guidance"][:, third * 64 + 2:(third + 1) * 64 - 2] == 1).all())
        assert float(s["guidance"].sum()) == pytest.approx(192 * 64, rel=0.05)
        assert int(s["image"][0, 0, 0].add(1).mul(127.5).round()) == 60 * target  # the image is the target's
        seen.add((target, third))
    assert len(seen) > 3


def test_centre_square_crop_takes_the_middle_of_the_long_side():
    """The authors' CropResize: margin (long - short) // 2 cut from the start of the long side."""
    from iconmatting_core.training.data import _crop_resize

    wide = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (80, 1)))  # 100 wide, 80 high: value = column
    assert np.asarray(_crop_resize(wide, 80, "nearest"))[0].tolist() == list(range(10, 90))
    tall = Image.fromarray(np.tile(np.arange(90, dtype=np.uint8)[:, None], (1, 60)))  # 60 wide, 90 high: value = row
    assert np.asarray(_crop_resize(tall, 60, "nearest"))[:, 0].tolist() == list(range(15, 75))


def test_16_bit_trimap_levels_are_scaled_not_clipped(tmp_path):
    """0 / 32768 / 65535 in a 16-bit trimap are background / unknown / foreground (clipping to 8 bits
    would make 32768 foreground)."""
    from iconmatting_core.eval import read_trimap

    levels = np.array([[0, 32768, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "t.png")
    assert read_trimap(tmp_path / "t.png").tolist() == [[0, 128, 255]]
    data = make_groups(tmp_path / "d", 1, 1, size=(30, 30))
    (data / "g0" / "trimaps").mkdir()
    Image.fromarray(np.repeat(np.repeat(levels, 10, axis=1), 30, axis=0)).save(data / "g0" / "trimaps" / "0.png")
    unknown = TrainSamples(load_train_data(data), 192, 42)[0]["unknown"][0]
    assert unknown[:, :64].sum() == 0 and bool(unknown[:, 64:128].all()) and unknown[:, 128:].sum() == 0


def test_data_digest_follows_the_groups_of_the_evaluation_layout(tmp_path):
    """Same files, other groups in the json: other data (a target's reference comes from its group)."""
    groups = make_groups(tmp_path / "src", 1, 2)
    for sub, folder in (("image", "images"), ("alpha", "alphas")):
        shutil.copytree(groups / "g0" / folder, tmp_path / "icm" / sub)
    record = {"class": "animal", "sub_class": None, "HalfOrFull": "half"}
    (tmp_path / "icm" / "ICM57.json").write_text(json.dumps({"0": record, "1": record}))
    before = load_train_data(tmp_path / "icm")
    (tmp_path / "icm" / "ICM57.json").write_text(json.dumps({"0": record, "1": {**record, "class": "human"}}))
    after = load_train_data(tmp_path / "icm")
    assert before.files == after.files and len(before.groups) == 1 and len(after.groups) == 2
    assert before.digest() != after.digest()


def test_trimap_levels_follow_the_authors_thresholds():
    """< 85 background, >= 170 foreground, between them unknown (the authors' ToTensor)."""
    from iconmatting_core.training.data import trimap_unknown

    levels = np.array([[0, 84, 85, 128, 169, 170, 255]], np.uint8)
    assert trimap_unknown(levels)[0].tolist() == [[0, 0, 1, 1, 1, 0, 0]]


def test_in_a_group_of_two_either_image_may_be_the_reference(tmp_path):
    """Only groups of more than two leave the target out; in a group of two the reference is either image."""
    data = load_train_data(make_groups(tmp_path / "d", 1, 2))
    samples = TrainSamples(data, 64, 42)
    refs = {samples.reference_index(0, np.random.default_rng(k)) for k in range(40)}
    assert refs == {0, 1}
    data3 = load_train_data(make_groups(tmp_path / "d3", 1, 3))
    refs3 = {TrainSamples(data3, 64, 42).reference_index(0, np.random.default_rng(k)) for k in range(40)}
    assert refs3 == {1, 2}


def test_a_cut_out_gives_its_alpha_channel_and_an_opaque_rgba_its_grey(tmp_path):
    """RGBA white with alpha 128: a cut-out, alpha 128/255. RGBA grey 51 all opaque: a mask saved as RGBA, 51/255."""
    cut = np.dstack([np.full((4, 4, 3), 255, np.uint8), np.full((4, 4), 128, np.uint8)])
    Image.fromarray(cut, "RGBA").save(tmp_path / "cut.png")
    opaque = np.dstack([np.full((4, 4, 3), 51, np.uint8), np.full((4, 4), 255, np.uint8)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert np.asarray(_read(tmp_path / "cut.png", "F")) == pytest.approx(np.full((4, 4), 128 / 255))
    assert np.asarray(_read(tmp_path / "opaque.png", "F")) == pytest.approx(np.full((4, 4), 51 / 255))


def test_the_files_of_a_skipped_image_are_not_the_runs_data(tmp_path):
    """An image whose alpha cannot be read is skipped; neither of its files is listed as used."""
    data = make_groups(tmp_path / "d", 1, 3)
    (data / "g0" / "alphas" / "1.png").write_bytes(b"not a png")
    td = load_train_data(data, log=lambda line: None)
    assert [i.name for i in td.items] == ["0", "2"]
    assert sorted(td.files) == ["g0/alphas/0.png", "g0/alphas/2.png", "g0/images/0.png", "g0/images/2.png"]
