"""Training (`python -m iconmatting_core train`): the authors' loss terms, data checks, the loop.

Loss values come from the authors' own loss code (tests/fixtures/train_loss, made by its
make_fixture.py from a checkout of their repository, see tests/fixtures/README.md); everything else
runs on tiny random models.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from iconmatting_core.__main__ import main
from iconmatting_core.training import losses as L
from iconmatting_core.training.data import TrainSamples, derived_unknown, load_train_data
from iconmatting_core.training.trainer import lr_factor
from documented_env import documented_env
from train_helpers import make_groups

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "train_loss"


# --------------------------------------------------------------------------- losses

def _fixture():
    t = load_file(str(FIXTURE / "inputs.safetensors"))
    return t["sample_map"], t["preds"], t["targets"], json.loads((FIXTURE / "expected.json").read_text())


def _close(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)  # same terms, same names (known_smooth_l1 logged as known_l1_loss)
    for k in theirs:
        assert float(ours[k]) == pytest.approx(theirs[k], rel=2e-6, abs=1e-6), k


def test_recipe_loss_terms_equal_the_authors_code():
    unknown, preds, targets, expected = _fixture()
    _close(L.recipe_losses(unknown, preds, targets), expected["train_batch"])
    for i, theirs in enumerate(expected["train_per_sample"]):
        _close(L.recipe_losses(unknown[i:i + 1], preds[i:i + 1], targets[i:i + 1]), theirs)
    # the quirks: constant alphas (samples 1, 2) get only the smooth-L1 term, a binary non-constant one all four
    assert list(expected["train_per_sample"][1]) == ["known_l1_loss"]
    assert len(expected["train_per_sample"][3]) == 4


def test_finetune_loss_terms_equal_the_authors_code():
    unknown, preds, targets, expected = _fixture()
    _close(L.finetune_losses(unknown, preds, targets), expected["finetune_batch"])
    for i, theirs in enumerate(expected["finetune_per_sample"]):
        _close(L.finetune_losses(unknown[i:i + 1], preds[i:i + 1], targets[i:i + 1]), theirs)


def test_loss_parts_by_hand():
    """The pieces the terms are built from, on values worked out by hand (the terms add |Sx| and |Sy|,
    so only this test tells d/dx from d/dy and a sign)."""
    ramp = torch.arange(5.0).repeat(5, 1)[None, None]  # value = column index
    slopes = L.sobel(ramp)[0, :, 1:-1, 1:-1]  # interior: (1 + 2 + 1) x (1 - (-1))
    assert torch.equal(slopes[0], torch.full((3, 3), 8.0)) and torch.equal(slopes[1], torch.zeros(3, 3))
    assert torch.equal(L.sobel(ramp.transpose(2, 3))[0, :, 1:-1, 1:-1], slopes.flip(0))
    assert L.huber(torch.tensor([0.5, -0.5, 2.0])).tolist() == [0.125, 0.125, 1.5]
    error = torch.zeros(1, 1, 4, 4)
    error[0, 0, 0, :2] = torch.tensor([1.0, 3.0])
    error[0, 0, 3, 3] = 100.0  # outside the region
    region = torch.zeros(1, 1, 4, 4)
    region[0, 0, 0, :2] = 1
    assert L.region_mean(error, region, per_sample=True).tolist() == [2.0 * 512 * 512 / 16]
    assert L.region_mean(error, torch.zeros_like(region), per_sample=False).item() == 0.0
    assert [b.shape[-1] for b in L.laplacian_bands(torch.rand(1, 1, 64, 66))] == [66, 32, 16, 8, 4]


def test_warmup_is_the_authors_linear_schedule():
    assert lr_factor(0, 250) == pytest.approx(1e-6, rel=1e-12)
    assert lr_factor(125, 250) == pytest.approx(0.5 + 0.5e-6, rel=1e-12)  # (1 - 1e-6) / 250 * 125 + 1e-6
    assert lr_factor(250, 250) == 1.0 and lr_factor(10**6, 250) == 1.0


def test_derived_trimap_band_around_a_hard_edge():
    alpha = torch.zeros(1, 8, 8)
    alpha[:, :, 4:] = 1  # a vertical edge between columns 3 and 4
    unknown = derived_unknown(alpha, 1)[0]
    expected = torch.zeros(8, 8)
    expected[:, 3:5] = 1  # one pixel each side
    assert torch.equal(unknown, expected)
    soft = torch.zeros(1, 8, 8)
    soft[0, 4, 4] = 0.5
    band = derived_unknown(soft, 1)[0]
    assert band.sum() == 9 and band[3:6, 3:6].all()


def test_trimap_files_are_thresholded_at_85_and_170():
    from iconmatting_core.training.data import trimap_unknown

    t = np.array([[0, 84, 85, 128, 169, 170, 255]], dtype=np.uint8)
    assert trimap_unknown(t)[0].tolist() == [[0, 0, 1, 1, 1, 0, 0]]


def test_alpha_files_gray_masks_and_cutouts(tmp_path):
    from iconmatting_core.training.data import _read

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 1, :3] = 255  # an opaque RGBA mask: its gray values
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    assert np.asarray(_read(tmp_path / "mask.png", "F")).tolist() == [[0, 1, 0], [0, 0, 0]]
    rgba[..., 3] = 0
    rgba[1, 2, 3] = 51  # a cut-out: its alpha channel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    assert np.asarray(_read(tmp_path / "cutout.png", "F")).tolist() == [[0, 0, 0], [0, 0, np.float32(0.2)]]
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "deep.png")
    assert np.asarray(_read(tmp_path / "deep.png", "F")).tolist() == [[0, 1]]


# --------------------------------------------------------------------------- data

def _refused(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def _argv(data, tmp_path, *more):
    # the SD path does not exist: a refusal about the data proves the data is checked first
    return ["train", "--data", str(data), "--sd", str(tmp_path / "no-sd"), "--out", str(tmp_path / "run"), *more]


def test_image_without_alpha_is_refused(tmp_path, capsys):
    data = make_groups(tmp_path / "d", 1, 2)
    (data / "g0" / "alphas" / "1.png").unlink()
    _refused(capsys, _argv(data, tmp_path), "1.png has no alpha", "alphas")


def test_alpha_of_another_size_is_refused(tmp_path, capsys):
    data = make_groups(tmp_path / "d", 1, 2)
    Image.new("L", (33, 21)).save(data / "g0" / "alphas" / "0.png")
    _refused(capsys, _argv(data, tmp_path), "alpha", "is 33x21", "100x80")


def test_empty_or_wrongly_laid_out_folders_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _refused(capsys, _argv(tmp_path / "empty", tmp_path), "not a training data folder")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    _refused(capsys, _argv(flat, tmp_path), "not a training data folder", "<group>/images")
    bad = tmp_path / "bad"
    (bad / "g0" / "images").mkdir(parents=True)
    _refused(capsys, _argv(bad, tmp_path), "no images/ and alphas/")
    _refused(capsys, _argv(tmp_path / "missing", tmp_path), "not found")


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    data = make_groups(tmp_path / "d", 1, 3)
    (data / "g0" / "images" / "2.png").write_bytes(b"not a png")
    lines = []
    loaded = load_train_data(data, log=lines.append)
    assert [i.name for i in loaded.items] == ["0", "1"]
    assert len(lines) == 1 and "skipping unreadable file" in lines[0] and "2.png" in lines[0]
    assert loaded.summary()["skipped"] == [str(data / "g0" / "images" / "2.png")]


def test_reference_draw_follows_the_authors_rule(tmp_path):
    data = load_train_data(make_groups(tmp_path / "d", 1, 3))  # > 2 images: never the target itself
    one = load_train_data(make_groups(tmp_path / "one", 1, 1))  # a group of one: allowed, the target itself
    two = load_train_data(make_groups(tmp_path / "two", 1, 2))  # two: either, the target included
    rng = np.random.default_rng(0)
    ds = TrainSamples(data, 128, 42)
    assert all(ds.reference_index(t, rng) != t for t in range(3) for _ in range(20))
    assert TrainSamples(one, 128, 42).reference_index(0, rng) == 0
    picks = {TrainSamples(two, 128, 42).reference_index(0, rng) for _ in range(40)}
    assert picks == {0, 1}
    s = TrainSamples(data, 128, 42)[5]
    assert s["image"].shape == (3, 128, 128) and s["alpha"].shape == (1, 128, 128)
    assert set(torch.unique(s["guidance"]).tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------- training on tiny models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import save_tiny_head, save_tiny_sd_folder

    root = tmp_path_factory.mktemp("train")
    return {"sd": save_tiny_sd_folder(root / "sd"), "init": save_tiny_head(root / "init.safetensors"),
            "data": make_groups(root / "data", 2, 3, seed=0), "val": make_groups(root / "val", 2, 2, seed=1)}


def _train_argv(tiny, out, *more):
    return ["train", "--data", str(tiny["data"]), "--sd", str(tiny["sd"]), "--out", str(out),
            "--init", str(tiny["init"]), "--workers", "0", "--no-progress", *more]


def _rows(run: Path):
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_the_held_out_sad(tiny, tmp_path):
    from iconmatting_core.checkpoint import load_head, training_metadata

    run = tmp_path / "run"
    argv = _train_argv(tiny, run, "--steps", "8", "--lr", "3e-3", "--warmup", "0", "--batch-size", "2",
                       "--loss", "recipe", "--val-data", str(tiny["val"]), "--val-every", "8", "--checkpoint-every", "8")
    assert main(argv) == 0
    rows = _rows(run)
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    sads = [float(r["val_sad"]) for r in rows if r["val_sad"]]
    assert len(losses) == 8 and len(sads) == 2
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert sads[1] < sads[0], sads  # held-out SAD of the trained head below the initial head's
    head, _ = load_head(run / "head.safetensors")  # the format `convert` writes
    meta = training_metadata(run / "head.safetensors")
    assert meta["step"] == 8 and meta["data"]["images"] == 6 and meta["data"]["groups"] == 2
    assert meta["sd_fingerprint"].startswith("sig1:") and meta["settings"]["lr"] == 3e-3
    assert meta["best_val_sad"]["step"] == 8


def _heads_equal(a: Path, b: Path, exact=True):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sigkill_then_resume_latest_is_bit_equal(tiny, tmp_path):
    common = ("--steps", "4", "--lr", "1e-3", "--warmup", "2", "--batch-size", "1", "--checkpoint-every", "1")
    env = documented_env({**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "iconmatting_core", *_train_argv(tiny, killed, *common)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-0000002").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step-0000002").is_dir() and not (killed / "head.safetensors").exists()
    assert main(_train_argv(tiny, killed, *common, "--resume", "latest")) == 0
    straight = tmp_path / "straight"
    assert main(_train_argv(tiny, straight, *common)) == 0
    _heads_equal(killed / "head.safetensors", straight / "head.safetensors")
    assert [r["loss"] for r in _rows(killed)] == [r["loss"] for r in _rows(straight)]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    from iconmatting_core.training import trainer

    calls = []

    def exploding(unknown, pred, target):  # the real terms; the third step's loss is NaN (one pair per step)
        calls.append(1)
        terms = L.recipe_losses(unknown, pred, target)
        return {k: v * float("nan") for k, v in terms.items()} if len(calls) == 3 else terms

    monkeypatch.setitem(trainer.LOSSES, "recipe", exploding)
    run = tmp_path / "run"
    code = main(_train_argv(tiny, run, "--steps", "5", "--loss", "recipe", "--checkpoint-every", "1", "--batch-size", "2"))
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: loss nan at step 3") and "training stopped" in err, err
    assert f"last good checkpoint: {run / 'checkpoints' / 'step-0000002'}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert not (run / "head.safetensors").exists() and len(_rows(run)) == 2


@pytest.mark.slow  # more than ~20 s on its own
def test_two_processes_give_the_head_of_one_with_the_same_global_batch(tiny, tmp_path):
    common = ("--steps", "2", "--lr", "1e-3", "--warmup", "0", "--loss", "recipe", "--checkpoint-every", "2")
    env = documented_env({**os.environ, "OMP_NUM_THREADS": "1"})
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "iconmatting_core", *_train_argv(tiny, tmp_path / "ddp", *common, "--batch-size", "4")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: the same summation order within each
    try:
        assert main(_train_argv(tiny, tmp_path / "one", *common, "--batch-size", "4")) == 0
    finally:
        torch.set_num_threads(threads)
    ddp_head, one_head = load_file(str(tmp_path / "ddp" / "head.safetensors")), load_file(str(tmp_path / "one" / "head.safetensors"))
    init = load_file(str(tiny["init"]))
    # Adam turns float-rounding differences of the gradient (DDP's all-reduce sums in another order) into
    # differences far below its step (lr = 1e-3 per step, 2 steps): 1% of it here. One exception: the
    # conv bias right before a BatchNorm, whose exact gradient is 0, so Adam's steps follow rounding noise
    # (bounded by lr per step), and the running mean of the BatchNorm it feeds takes momentum (0.1) of it.
    zero_gradient = {"detail.alpha_head.0.bias": 2e-3, "detail.alpha_head.1.running_mean": 0.1 * 2e-3 * 2}
    for k, v in ddp_head.items():
        if not v.dtype.is_floating_point:
            assert torch.equal(v, one_head[k]), k  # num_batches_tracked: rank 0's BatchNorm group
            continue
        bound = zero_gradient.get(k, 2e-5)
        assert (v - one_head[k]).abs().max() <= bound, k
        if k not in zero_gradient and k.endswith("weight") and "conv" in k:
            assert (v - init[k]).abs().max() > 1e-3, k  # it did train


def test_benchmark_smoke_mode(capsys):
    import runpy

    bench = runpy.run_path(str(REPO / "benchmarks" / "benchmark_train.py"), run_name="benchmark_train")
    assert bench["main"](["--device", "cpu", "--image-size", "128", "--tiny", "--steps", "1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "steps/s:" in out and "SD features" in out and "head fwd+bwd+step" in out and "peak memory" in out, out


def test_one_training_step_gives_the_authors_updated_head():
    """Same head, batch and (fixed, SD-free) features: our head step equals one step of the authors'
    InContextDecoder + LossFunction2 + Adam (tests/fixtures/train_step, made by their code)."""
    from core_helpers import ours_to_reference
    from iconmatting_core.config import IconMattingConfig
    from iconmatting_core.context import region_tokens
    from iconmatting_core.preprocess import Placement
    from tiny_models import tiny_head
    from iconmatting_core.training.trainer import HeadStep

    here = REPO / "tests" / "fixtures" / "train_step"
    x, theirs = load_file(str(here / "inputs.safetensors")), load_file(str(here / "updated.safetensors"))
    expected = json.loads((here / "expected.json").read_text())
    config = IconMattingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in expected["config"].items()})
    head = tiny_head(config, seed=3).train()
    full = Placement(128, 128, 128, 128)
    tokens = [region_tokens(x["ref_feature"][i], (x["guidance"][i, 0] > 0.5).float(), full, 128, "mask") for i in range(2)]
    pred = HeadStep(head, 2)(tokens, x["ft_cor"], x["ft_4"], x["ft_8"], {4: x["attn_4"], 8: x["attn_8"]}, x["images"])
    unknown = (x["trimap"] == 0.5).float()
    terms = L.recipe_losses(unknown, pred, x["alpha"])
    loss = sum(terms.values())
    assert float(loss.detach()) == pytest.approx(expected["loss"], rel=1e-6)
    for k, v in terms.items():
        assert float(v.detach()) == pytest.approx(expected["terms"][k], rel=1e-6), k
    opt = torch.optim.Adam(head.parameters(), lr=expected["lr"], weight_decay=0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ours = {k[len("in_context_decoder."):]: v for k, v in ours_to_reference(head.state_dict()).items()}
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        if k == "detail_decoder.matting_head.matting_convs.0.bias":  # conv bias before BatchNorm: exact gradient 0
            assert (ours[k] - v).abs().max() <= expected["lr"], k  # so Adam's step follows rounding noise
        else:
            # Adam's first step moves every weight by ~lr x sign(gradient): a wrong gradient shows in most
            # elements. Rounding (thread count, summation order) can only tip the few whose gradient is ~0.
            off = (ours[k] - v).abs()
            assert off.max() <= 2 * expected["lr"] and (off > 1e-6).float().mean() <= 1e-3, k


HANG_UP = r"""
import os, socket, sys, time
from multiprocessing import resource_sharer
from iconmatting_core.training.trainer import leave_ctrl_c_to_the_trainer

if sys.argv[1] == "worker":
    leave_ctrl_c_to_the_trainer(0)  # what the trainer's DataLoader runs in each of its workers
read_end, _ = os.pipe()
offered = resource_sharer.DupFd(read_end)  # a batch's file descriptor offered to the trainer: the server starts
address, _key = offered._id
client = socket.socket(socket.AF_UNIX)
client.connect(address)
client.close()  # the trainer, interrupted, hangs up half-way through the hand-over
time.sleep(1)
try:
    raise ValueError("any other error")
except ValueError:
    sys.excepthook(*sys.exc_info())
"""


@pytest.mark.parametrize("role", ["worker", "control"])
def test_a_data_worker_says_nothing_when_the_trainer_hangs_up_on_a_batch(role):
    """The multiprocessing hand-over of a batch's shared memory, cut off by the trainer (as Ctrl-C does, seen in CI
    after the trainer's one line): a worker set up by the trainer prints nothing of it; any other error still shows.
    The control (a process not set up so) prints the serving thread's traceback (EOFError or BrokenPipeError, by
    timing): the hang-up is reproduced."""
    done = subprocess.run([sys.executable, "-c", HANG_UP, role], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ("multiprocessing/resource_sharer.py" in done.stderr) is (role == "control"), done.stderr  # its traceback
    assert done.stderr.rstrip().endswith("ValueError: any other error")
