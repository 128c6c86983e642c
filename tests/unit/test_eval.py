"""ICM-57 evaluation driver on a tiny synthetic data set with fake predictors."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from iconmatting_core import eval as E
from iconmatting_core.eval import metrics as M

# group key = f"{class}-{sub_class}-{HalfOrFull}" as in the reference's ContextData
RECORDS = {
    "dog_b": {"dataset_name": "ICM57", "class": "dog", "sub_class": None, "HalfOrFull": "half", "TransparentOrOpaque": "SO"},
    "dog_a": {"dataset_name": "ICM57", "class": "dog", "sub_class": None, "HalfOrFull": "half", "TransparentOrOpaque": "SO"},
    "dog_c": {"dataset_name": "ICM57", "class": "dog", "sub_class": None, "HalfOrFull": "half", "TransparentOrOpaque": "SO"},
    "cup_1": {"dataset_name": "ICM57", "class": "cup", "sub_class": "glass", "HalfOrFull": "full", "TransparentOrOpaque": "T"},
    "cup_2": {"dataset_name": "ICM57", "class": "cup", "sub_class": "glass", "HalfOrFull": "full", "TransparentOrOpaque": "T"},
    "lamp": {"dataset_name": "ICM57", "class": "lamp", "sub_class": None, "HalfOrFull": "full", "TransparentOrOpaque": "SO"},
}
SIZES = {"dog_a": (48, 64), "dog_b": (40, 56), "dog_c": (64, 48), "cup_1": (48, 64), "cup_2": (48, 64), "lamp": (32, 40)}


def _alpha(h, w, seed, radius=0.2):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    return np.clip(1.5 - np.hypot(yy - cy, xx - cx) / (radius * min(h, w)), 0, 1)


def make_dataset(root, with_trimap=False, json_where="sibling", radius=0.2):
    data = root / "ICM57"
    for sub in ("image", "alpha") + (("trimap",) if with_trimap else ()):
        (data / sub).mkdir(parents=True)
    for i, (name, (h, w)) in enumerate(sorted(SIZES.items())):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(data / "image" / f"{name}.jpg")
        a8 = np.round(_alpha(h, w, i, radius) * 255).astype(np.uint8)
        Image.fromarray(a8).save(data / "alpha" / f"{name}.png")
        if with_trimap:
            t = np.where(a8 == 0, 0, np.where(a8 == 255, 255, 128)).astype(np.uint8)
            Image.fromarray(t).save(data / "trimap" / f"{name}.png")
    # an image on disk but not in the json is ignored, like in the reference
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "image" / "extra.jpg")
    jpath = root / "ICM57.json" if json_where == "sibling" else data / "ICM57.json"
    jpath.write_text(json.dumps(RECORDS))
    return data


def gt_of(data, name):
    return np.asarray(Image.open(data / "alpha" / f"{name}.png"), dtype=np.float64) / 255.0


class Recorder:
    """Fake predictor: returns a function of the target's ground truth; records the calls."""

    def __init__(self, data, mode="gt"):
        self.data, self.mode, self.calls = data, mode, []

    def __call__(self, ref_image, ref_mask, targets):
        assert ref_image.dtype == np.float32 and ref_image.ndim == 3 and ref_image.shape[2] == 3
        assert ref_mask.dtype == np.float32 and ref_mask.shape == ref_image.shape[:2]
        assert 0 <= ref_image.min() and ref_image.max() <= 1
        ref = self._identify(ref_image)
        np.testing.assert_allclose(ref_mask, gt_of(self.data, ref), atol=1e-6)  # guidance = reference alpha
        names = [self._identify(t) for t in targets]
        self.calls.append((ref, names))
        if self.mode == "zeros":
            return [np.zeros(t.shape[:2], np.float32) for t in targets]
        return [gt_of(self.data, n).astype(np.float32) for n in names]

    def _identify(self, img):
        for name in SIZES:
            ref = np.asarray(Image.open(self.data / "image" / f"{name}.jpg"), dtype=np.float32) / 255.0
            if ref.shape == img.shape and np.array_equal(ref, img):
                return name
        raise AssertionError("unknown image passed to predict_fn")


def test_load_dataset_groups_and_layout(tmp_path):
    data = make_dataset(tmp_path)
    ds = E.load_dataset(data)
    assert ds.json_path == tmp_path / "ICM57.json"  # the reference's datasets/ICM57.json
    assert list(ds.groups) == ["cup-glass-full", "dog-None-half", "lamp-None-full"]
    assert [s.name for s in ds.groups["dog-None-half"]] == ["dog_a", "dog_b", "dog_c"]
    assert len(ds) == 6 and "extra" not in ds.samples
    s = ds.samples["dog_a"]
    assert s.image_path == data / "image" / "dog_a.jpg" and s.alpha_path == data / "alpha" / "dog_a.png"
    assert s.trimap_path is None


def test_json_inside_data_folder_and_explicit(tmp_path):
    data = make_dataset(tmp_path, json_where="inside")
    assert E.load_dataset(data).json_path == data / "ICM57.json"
    other = tmp_path / "groups.json"
    other.write_text(json.dumps({"lamp": RECORDS["lamp"]}))
    assert list(E.load_dataset(data, other).groups) == ["lamp-None-full"]


def test_reference_plan_is_deterministic():
    assert E.reference_plan(["c", "a", "b"]) == [("a", ["b", "c"]), ("b", ["a"])]
    assert E.reference_plan(["y", "x"]) == [("x", ["y"]), ("y", ["x"])]
    assert E.reference_plan(["solo"]) == [("solo", ["solo"])]
    assert E.reference_plan([]) == []


def test_evaluate_perfect_predictor_gives_zero(tmp_path):
    data = make_dataset(tmp_path)
    fake = Recorder(data, "gt")
    res = E.evaluate(E.load_dataset(data), fake)
    assert fake.calls == [
        ("cup_1", ["cup_2"]), ("cup_2", ["cup_1"]),
        ("dog_a", ["dog_b", "dog_c"]), ("dog_b", ["dog_a"]),
        ("lamp", ["lamp"]),
    ]
    assert sorted(r.name for r in res.images) == sorted(SIZES)  # each image scored once
    refs = {r.name: r.reference for r in res.images}
    assert refs == {"cup_2": "cup_1", "cup_1": "cup_2", "dog_b": "dog_a", "dog_c": "dog_a", "dog_a": "dog_b", "lamp": "lamp"}
    for r in res.images:
        assert r.metrics() == {"sad": 0.0, "mse": 0.0, "grad": 0.0, "conn": 0.0}
    assert res.mean() == {"sad": 0.0, "mse": 0.0, "grad": 0.0, "conn": 0.0}


def test_evaluate_zero_predictor_sad_is_alpha_sum(tmp_path):
    data = make_dataset(tmp_path)
    res = E.evaluate(E.load_dataset(data), Recorder(data, "zeros"))
    for r in res.images:
        gt = gt_of(data, r.name)
        assert gt.shape == SIZES[r.name]  # metrics at the original resolution
        assert r.sad == pytest.approx(gt.sum() / 1000)
        assert r.mse == pytest.approx((gt ** 2).mean())  # the paper's unit: no scaling
        assert r.grad == pytest.approx(M.gradient_error(np.zeros_like(gt), gt))
        assert r.conn == pytest.approx(M.connectivity_error(np.zeros_like(gt), gt))
    assert res.mean()["sad"] == pytest.approx(np.mean([gt_of(data, n).sum() / 1000 for n in SIZES]))
    gm = res.group_means()
    assert gm["dog-None-half"]["sad"] == pytest.approx(np.mean([gt_of(data, n).sum() / 1000 for n in ("dog_a", "dog_b", "dog_c")]))


def test_limit_region_out_and_resize(tmp_path):
    data = make_dataset(tmp_path, with_trimap=True)
    ds = E.load_dataset(data, require_trimap=True)

    def half_size(ref_image, ref_mask, targets):  # wrong size: resized to the target's
        return [np.full((t.shape[0] // 2, t.shape[1] // 2), 0.5, np.float32) for t in targets]

    out = tmp_path / "out"
    res = E.evaluate(ds, half_size, region="unknown", limit=1, out_dir=out)
    assert [r.name for r in res.images] == ["cup_2", "cup_1"]
    for r in res.images:
        gt = gt_of(data, r.name)
        tri = np.asarray(Image.open(data / "trimap" / f"{r.name}.png"))
        assert r.sad == pytest.approx(np.abs(0.5 - gt)[tri == 128].sum() / 1000)
        saved = np.asarray(Image.open(out / f"{r.name}.png"))
        assert saved.shape == gt.shape and (saved == 128).all()
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["cup_2", "cup_1"] and rows[0]["reference"] == "cup_1"


def test_quantize_floor(tmp_path):
    data = make_dataset(tmp_path)
    ds = E.load_dataset(data)

    def almost_one(ref_image, ref_mask, targets):
        return [np.full(t.shape[:2], 0.9999, np.float32) for t in targets]

    plain = E.evaluate(ds, almost_one, limit=1)
    floor = E.evaluate(ds, almost_one, limit=1, quantize="floor")
    r0, r1 = plain.images[0], floor.images[0]
    gt = gt_of(data, r0.name)
    assert r1.sad == pytest.approx(np.abs(254 / 255 - gt).sum() / 1000)
    assert r0.sad == pytest.approx(np.abs(0.9999 - gt).sum() / 1000, rel=1e-5)


def test_bad_predictor_outputs(tmp_path):
    data = make_dataset(tmp_path)
    ds = E.load_dataset(data)
    with pytest.raises(ValueError, match="returned 0 alphas for 1 target"):
        E.evaluate(ds, lambda r, m, t: [], limit=1)
    with pytest.raises(ValueError, match="NaN"):
        E.evaluate(ds, lambda r, m, t: [np.full(x.shape[:2], np.nan) for x in t], limit=1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        E.evaluate(ds, lambda r, m, t: [np.full(x.shape[:2], 255.0) for x in t], limit=1)


# ----------------------------------------------------------------- CLI


def fake_factory(args):
    """--predictor test_eval:fake_factory -> a predictor that returns all-zero mattes."""
    return lambda ref_image, ref_mask, targets: [np.zeros(t.shape[:2], np.float32) for t in targets]


def table_row(lines, first):
    return next(line for line in lines if line.split() and line.split()[0] == first).split()


def test_main_prints_table(tmp_path, capsys):
    data = make_dataset(tmp_path)
    assert E.main(["--data", str(data), "--per-group", "--predictor", "test_eval:fake_factory"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ICM-57: 3 groups, 6 target images"
    header = next(line for line in lines if line.startswith("Protocol"))
    assert header.split() == ["Protocol", "Refs", "Region", "Images", "MSE", "SAD", "Grad", "Conn"]  # the paper's order
    overall = table_row(lines, "project")
    assert overall[1:4] == ["1", "all", "6"]
    mse = np.mean([(gt_of(data, n) ** 2).mean() for n in SIZES])
    assert overall[4] == f"{mse:.4f}"
    assert overall[5] == f"{np.mean([gt_of(data, n).sum() / 1000 for n in SIZES]):.2f}"
    dog = table_row(lines, "dog-None-half")
    want = np.mean([gt_of(data, n).sum() / 1000 for n in ("dog_a", "dog_b", "dog_c")])
    assert dog[3] == "3" and dog[5] == f"{want:.2f}"


def test_main_overall_only_with_predict_fn_hook(tmp_path, capsys):
    data = make_dataset(tmp_path)
    E.main(["--data", str(data)], predict_fn=Recorder(data, "gt"))
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert not any(line.startswith("dog-") for line in lines)
    assert table_row(lines, "project")[1:] == ["1", "all", "6", "0.0000", "0.00", "0.00", "0.00"]
    assert "reference dog_a -> dog_b, dog_c" in captured.err  # progress goes to stderr


def test_missing_alpha_names_the_file(tmp_path):
    data = make_dataset(tmp_path)
    (data / "alpha" / "dog_b.png").unlink()
    with pytest.raises(ValueError, match=r"no alpha matte for image 'dog_b'.*alpha[/\\]dog_b\.png"):
        E.load_dataset(data)
    with pytest.raises(SystemExit, match=r"dog_b\.png"):
        E.main(["--data", str(data), "--predictor", "test_eval:fake_factory"])


def test_bad_data_dirs(tmp_path):
    with pytest.raises(E.DatasetError, match="data folder not found"):
        E.load_dataset(tmp_path / "nope")
    data = make_dataset(tmp_path)
    (tmp_path / "ICM57.json").unlink()
    with pytest.raises(E.DatasetError, match=r"no group json found.*ICM57\.json"):
        E.load_dataset(data)
    (data / "ICM57.json").write_text(json.dumps({"dog_a": {"class": "dog"}}))
    with pytest.raises(E.DatasetError, match="'dog_a' must be an object with keys class, sub_class, HalfOrFull"):
        E.load_dataset(data)
    (data / "ICM57.json").write_text(json.dumps({"ghost": RECORDS["lamp"]}))
    with pytest.raises(E.DatasetError, match=r"image 'ghost'.*ghost\.jpg"):
        E.load_dataset(data)
    (data / "ICM57.json").write_text(json.dumps(RECORDS))
    with pytest.raises(E.DatasetError, match="no trimap/ folder"):
        E.load_dataset(data, require_trimap=True)
    # mismatched image / alpha sizes are reported with both files
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "alpha" / "lamp.png")
    with pytest.raises(E.DatasetError, match=r"lamp\.jpg is 40x32 but its alpha .*lamp\.png is 10x10"):
        E.evaluate(E.load_dataset(data), fake_factory(None))


def test_main_requires_weights_without_predictor(tmp_path, capsys):
    data = make_dataset(tmp_path)
    with pytest.raises(SystemExit):
        E.main(["--data", str(data)])
    assert "--matting-weights and --sd are required" in capsys.readouterr().err


def test_build_predict_fn_uses_pipeline(monkeypatch):
    torch = pytest.importorskip("torch")
    import iconmatting_core.pipeline as P

    seen = {}

    class FakePipe:
        def encode_reference(self, images, masks):
            seen["ref"] = (images.shape, masks.shape)
            return "ctx"

        def matte(self, context, images):
            assert context == "ctx"
            return [torch.full(im.shape[:2], 0.25) for im in images]

    def fake_load(matting_weights, sd_path, device, dtype):
        seen["load"] = (matting_weights, sd_path, device, dtype)
        return FakePipe()

    monkeypatch.setattr(P, "load_pipeline", fake_load)
    args = E.cli._parser().parse_args(
        ["--data", "x", "--matting-weights", "w.safetensors", "--sd", "sd", "--device", "cpu", "--dtype", "fp32"]
    )
    fn = E.build_predict_fn(args)
    outs = fn(np.zeros((5, 6, 3), np.float32), np.zeros((5, 6), np.float32), [np.zeros((3, 4, 3), np.float32)])
    assert seen == {"load": ("w.safetensors", "sd", "cpu", "fp32"), "ref": ((5, 6, 3), (5, 6))}
    assert isinstance(outs[0], np.ndarray) and outs[0].shape == (3, 4) and np.allclose(outs[0], 0.25)


def test_main_with_the_tiny_model(tmp_path, tiny_dir, capsys):
    """End to end through build_predict_fn -> load_pipeline -> encode_reference / matte."""
    data = make_dataset(tmp_path, radius=0.45)  # large enough to cover a feature cell at 128 px
    out = tmp_path / "out"
    argv = ["--data", str(data), "--matting-weights", str(tiny_dir / "head.safetensors"), "--sd", str(tiny_dir / "sd"),
            "--device", "cpu", "--dtype", "fp32", "--limit", "1", "--out", str(out)]
    assert E.main(argv) == 0
    overall = table_row(capsys.readouterr().out.splitlines(), "project")
    assert overall[1:4] == ["1", "all", "2"] and all(np.isfinite(float(v)) for v in overall[4:])
    for name in ("cup_1", "cup_2"):
        assert np.asarray(Image.open(out / f"{name}.png")).shape == SIZES[name]


# ----------------------------------------------------------------- reference protocol


def test_centre_crop_box():
    assert E.centre_crop_box(100, 60) == (20, 80, 0, 60)  # tall: rows cut, margin (100 - 60) // 2
    assert E.centre_crop_box(60, 100) == (0, 60, 20, 80)
    assert E.centre_crop_box(61, 100) == (0, 61, 19, 80)  # odd difference: the extra pixel goes at the end
    assert E.centre_crop_box(50, 50) == (0, 50, 0, 50)


def test_crop_resize_takes_the_centre_square():
    img = np.zeros((40, 64, 3), np.float32)
    img[:, 12:52] = 1.0  # exactly the centre square
    out = E.crop_resize(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32 and np.allclose(out, 1.0)
    matte = np.zeros((64, 40), np.float32)
    matte[12:52] = np.linspace(0, 1, 40, dtype=np.float32)[:, None]
    m = E.crop_resize(matte, 40)
    assert m.shape == (40, 40) and np.allclose(m, matte[12:52])  # same size: the crop, untouched


def test_draw_references_rules_and_determinism():
    group = ["d", "a", "c", "b", "e"]
    for seed in range(20):
        for target in group:
            refs = E.draw_references(group, target, 1, seed)
            assert len(refs) == 1 and refs[0] != target and refs[0] in group
            assert E.draw_references(list(reversed(group)), target, 1, seed) == refs  # order-independent
            three = E.draw_references(group, target, 3, seed)
            assert len(set(three)) == 3 and target not in three
    assert len(E.draw_references(group, "a", 9, 0)) == 4  # capped at the candidates
    drawn = {E.draw_references(group, "a", 1, seed) for seed in range(20)}
    assert len(drawn) > 1  # the seed matters
    pair = {E.draw_references(["x", "y"], "x", 1, seed)[0] for seed in range(30)}
    assert pair == {"x", "y"}  # groups of two: the target itself may be drawn, as in the reference
    assert E.draw_references(["solo"], "solo") == ("solo",)
    with pytest.raises(ValueError, match="not in its group"):
        E.draw_references(["a", "b"], "z")


def test_reference_jobs_cover_every_target_once():
    groups = {"g1": ["a", "b", "c", "d"], "g2": ["x", "y"], "g3": ["s"]}
    for k in (1, 2):
        jobs = E.reference_jobs(groups, k, seed=3)
        targets = [t for _, _, ts in jobs for t in ts]
        assert sorted(targets) == sorted(n for names in groups.values() for n in names)
        for group, refs, ts in jobs:
            for t in ts:
                assert refs == E.draw_references(groups[group], t, k, 3)
    assert E.reference_jobs(groups, 1, 3) == E.reference_jobs(groups, 1, 3)


class SquareRecorder:
    """Fake predictor for the reference protocol: checks what the model gets, returns a square
    left-to-right ramp (so the stretch back over the original frame is visible in the metrics)."""

    image_size = 32

    def __init__(self, data):
        self.data, self.calls = data, []

    def __call__(self, ref_images, ref_masks, targets):
        if not isinstance(ref_images, list):
            ref_images, ref_masks = [ref_images], [ref_masks]
        refs = []
        for img, mask in zip(ref_images, ref_masks):
            assert img.shape == (32, 32, 3) and mask.shape == (32, 32)
            name = self._identify(img)
            np.testing.assert_allclose(mask, E.crop_resize(gt_of(self.data, name).astype(np.float32), 32), atol=1e-6)
            refs.append(name)
        names = [self._identify(t) for t in targets]
        self.calls.append((tuple(refs), names))
        return [ramp() for _ in targets]

    def _identify(self, img):
        for name in SIZES:
            full = np.asarray(Image.open(self.data / "image" / f"{name}.jpg"), dtype=np.float32) / 255.0
            if np.array_equal(E.crop_resize(full, 32), img):
                return name
        raise AssertionError("predict_fn got an image that is not a crop-resized data set image")


def ramp():
    return np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))


def test_reference_protocol_steps(tmp_path):
    data = make_dataset(tmp_path, with_trimap=True)
    ds = E.load_dataset(data, require_trimap=True)
    fake = SquareRecorder(data)
    runs = E.run_protocol(ds, fake, "reference", ["unknown", "all"], seed=5, image_size=32, quantize="none")
    assert [(r.protocol, r.references, r.region) for r in runs] == [("reference", 1, "unknown"), ("reference", 1, "all")]
    groups = {g: [s.name for s in m] for g, m in ds.groups.items()}
    seen = {t: refs for refs, ts in fake.calls for t in ts}
    assert sorted(seen) == sorted(SIZES)
    for g, names in groups.items():
        for t in names:
            assert seen[t] == E.draw_references(names, t, 1, 5)
            if len(names) > 2:
                assert t not in seen[t]
    unknown, whole = ({r.name: r for r in run.images} for run in runs)
    for name, (h, w) in SIZES.items():
        gt = gt_of(data, name)
        back = E.scoring._resize_alpha(ramp(), (h, w))  # the square stretched over the whole frame
        assert back.shape == (h, w) and back[:, 0].max() < 0.05 and back[:, -1].min() > 0.95
        tri = np.asarray(Image.open(data / "trimap" / f"{name}.png"))
        band = (tri >= 85) & (tri < 170)
        assert whole[name].sad == pytest.approx(np.abs(back - gt).sum() / 1000, rel=1e-5)
        assert unknown[name].sad == pytest.approx(np.abs(back - gt)[band].sum() / 1000, rel=1e-5)
        assert unknown[name].mse == pytest.approx(((back - gt) ** 2)[band].mean(), rel=1e-5)  # unscaled
    # seeded: the same run again gives the same numbers
    again = E.run_protocol(ds, SquareRecorder(data), "reference", ["unknown"], seed=5, image_size=32, quantize="none")
    assert [r.metrics() for r in again[0].images] == [r.metrics() for r in runs[0].images]


def test_reference_protocol_several_references_and_floor(tmp_path):
    data = make_dataset(tmp_path, with_trimap=True)
    ds = E.load_dataset(data)
    fake = SquareRecorder(data)
    run = E.run_protocol(ds, fake, "reference", ["all"], references=2, image_size=32, quantize="floor")[0]
    by_target = {t: refs for refs, ts in fake.calls for t in ts}
    assert len(by_target["dog_a"]) == 2 and "dog_a" not in by_target["dog_a"]
    assert len(by_target["lamp"]) == 1  # a group of one has one candidate
    r = next(r for r in run.images if r.name == "cup_1")
    back = np.floor(E.scoring._resize_alpha(ramp(), SIZES["cup_1"]) * 255) / 255
    assert r.sad == pytest.approx(np.abs(back - gt_of(data, "cup_1")).sum() / 1000, rel=1e-5)
    assert r.reference == "+".join(by_target["cup_1"])
    with pytest.raises(ValueError, match="project protocol uses one reference"):
        E.run_protocol(ds, fake, "project", ["all"], references=2)


def square_factory(args):
    """--predictor test_eval:square_factory -> ramps of the predictor's image size."""
    def predict(ref_images, ref_masks, targets):
        return [ramp() for _ in targets]

    predict.image_size = 32
    return predict


def test_main_rows_per_protocol_references_and_region(tmp_path, capsys):
    data = make_dataset(tmp_path, with_trimap=True)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--predictor", "test_eval:square_factory", "--protocol", "project", "reference",
            "--references", "1", "3", "--region", "unknown", "all", "--out", str(out)]
    assert E.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[:3] for line in lines if line.split() and line.split()[0] in ("project", "reference")]
    assert rows == [["project", "1", "unknown"], ["project", "1", "all"], ["reference", "1", "unknown"],
                    ["reference", "1", "all"], ["reference", "3", "unknown"], ["reference", "3", "all"]]
    assert sorted(p.name for p in out.iterdir()) == ["project-k1", "reference-k1", "reference-k3"]
    with open(out / "reference-k3" / "metrics.csv") as f:
        assert {row["region"] for row in csv.DictReader(f)} == {"unknown", "all"}
    # defaults: the reference protocol scores the unknown region
    E.main(["--data", str(data), "--predictor", "test_eval:square_factory", "--protocol", "reference"])
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("reference")]
    assert rows == [["reference", "1", "unknown"]]


def test_reference_protocol_with_the_tiny_model(tmp_path, tiny_dir, capsys):
    """End to end: crop to the model's 128 px, one or two drawn references encoded into one context."""
    data = make_dataset(tmp_path, with_trimap=True, radius=0.45)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--matting-weights", str(tiny_dir / "head.safetensors"), "--sd", str(tiny_dir / "sd"),
            "--device", "cpu", "--protocol", "reference", "--references", "1", "2", "--region", "unknown", "all",
            "--limit", "1", "--out", str(out)]
    assert E.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith("reference")]
    assert [r[:4] for r in rows] == [["reference", "1", "unknown", "2"], ["reference", "1", "all", "2"],
                                     ["reference", "2", "unknown", "2"], ["reference", "2", "all", "2"]]
    assert all(np.isfinite(float(v)) for r in rows for v in r[4:])
    for k in (1, 2):
        for name in ("cup_1", "cup_2"):
            assert np.asarray(Image.open(out / f"reference-k{k}" / f"{name}.png")).shape == SIZES[name]
