"""The training loop in this process, on a stand-in SD extractor (train_helpers.FakeExtractor) and a
tiny head: checkpoints and resume, validation and the head kept, the noise of references, the
objective's split over processes.

Expected values come from outside the loop: literal step numbers of a run whose best validation is
not its last, the authors' loss on each pair of samples (``losses``, checked against their code in
tests/jobs/test_train.py), the noise streams inference uses.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iconmatting_core.checkpoint import training_metadata
from iconmatting_core.features import REFERENCE_NOISE, TARGET_NOISE
from iconmatting_core.training import losses as L
from iconmatting_core.training import state as S
from iconmatting_core.training.data import TrainSamples, load_train_data
from iconmatting_core.training.trainer import HeadStep, Trainer, TrainingStopped, TrainSettings, group_objective, noise_seed
from tiny_models import tiny_head
from train_helpers import FakeExtractor, make_groups


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": load_train_data(make_groups(root / "train", 2, 3)), "val": load_train_data(make_groups(root / "val", 1, 2, seed=1))}


def _trainer(run: Path, data, val=None, **settings) -> Trainer:
    head = tiny_head()
    s = TrainSettings(out=str(run), **{"warmup": 0, "lr": 1e-3, "batch_size": 2, "checkpoint_every": 1,
                                       "checkpoints_total_limit": None, **settings})
    lines = []
    t = Trainer(s, data, FakeExtractor(head.config), head, torch.device("cpu"), val, log=lines.append, progress=False)
    t.lines = lines
    return t


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- checkpoints

def _fake_checkpoints(run: Path, steps, limit):
    for step in steps:
        S.save_checkpoint(run, step, {"step": step}, lambda p, step=step: p.write_text(f"head of step {step}"), limit)


def test_pruning_keeps_the_newest_checkpoints_and_resume_takes_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, [1, 2, 3, 4, 5], limit=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-0000004", "step-0000005"]
    assert S.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints" / "step-0000005"
    assert (S.resolve_resume(tmp_path, "latest") / "head.safetensors").read_text() == "head of step 5"


def test_a_checkpoint_cut_off_by_a_kill_is_removed_on_start_and_the_whole_ones_kept(tmp_path):
    _fake_checkpoints(tmp_path, [1], limit=None)

    def killed(path):
        raise KeyboardInterrupt  # the head never written: the folder stays under its temporary name

    with pytest.raises(KeyboardInterrupt):
        S.save_checkpoint(tmp_path, 2, {"step": 2}, killed, None)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # step-0000001 and the cut-off one
    assert [p.name for p in S.checkpoint_dirs(tmp_path)] == ["step-0000001"]  # never taken for a checkpoint
    S.remove_partial(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]
    _fake_checkpoints(tmp_path, [1], limit=None)  # a step written again replaces its folder whole
    assert (tmp_path / "checkpoints" / "step-0000001" / "head.safetensors").read_text() == "head of step 1"


def test_checkpoint_order_is_by_step_number(tmp_path):
    for step in (9, 10, 100):  # as text "step-9" > "step-10": the order is numeric
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"")
    assert [p.name for p in S.checkpoint_dirs(tmp_path)] == ["step-9", "step-10", "step-100"]
    assert S.resolve_resume(tmp_path, "latest").name == "step-100"


def test_no_limit_keeps_every_checkpoint(tmp_path):
    _fake_checkpoints(tmp_path, [1, 2, 3], limit=None)
    assert len(S.checkpoint_dirs(tmp_path)) == 3


def test_resume_takes_a_checkpoint_folder_or_its_state_file(tmp_path):
    """--resume RUN/checkpoints/step-0000003 or .../step-0000003/state.pt: that folder; a folder without state.pt: refused."""
    _fake_checkpoints(tmp_path, [3], None)
    folder = tmp_path / "checkpoints" / "step-0000003"
    assert S.resolve_resume(tmp_path, str(folder)) == folder
    assert S.resolve_resume(tmp_path, str(folder / "state.pt")) == folder
    with pytest.raises(S.ResumeError, match="not a checkpoint folder"):
        S.resolve_resume(tmp_path, str(tmp_path / "checkpoints"))


def _history_of(run: Path, entries):
    S.write_record(run, {"history": entries, "files": {}})
    return run / "checkpoints" / "step-0000004"


def test_resuming_at_a_step_where_the_recipe_changed_keeps_that_change(tmp_path):
    """History: recipe A from step 0, B from step 4 (a resume with changes). Resumed again from step 4
    with B: both entries stay (B is what the checkpoint was trained with from step 4)."""
    a, b = {"lr": 1}, {"lr": 2}
    history = [{"step": 0, "recipe": a, "processes": 1}, {"step": 4, "recipe": b, "processes": 1, "changed": ["--lr 1 -> 2"]}]
    resume_dir = _history_of(tmp_path, history)
    assert S.run_history(tmp_path, resume_dir, 4, b, [], 1) == history


def test_a_change_at_a_step_replaces_the_entry_of_that_step(tmp_path):
    """Same history, resumed from step 4 with recipe C: the entry of step 4 becomes C, never two entries of one step."""
    a, b, c = {"lr": 1}, {"lr": 2}, {"lr": 3}
    resume_dir = _history_of(tmp_path, [{"step": 0, "recipe": a, "processes": 1}, {"step": 4, "recipe": b, "processes": 1}])
    assert S.run_history(tmp_path, resume_dir, 4, c, ["--lr 2 -> 3"], 1) == [
        {"step": 0, "recipe": a, "processes": 1}, {"step": 4, "recipe": c, "processes": 1, "changed": ["--lr 2 -> 3"]}]


def test_a_resumed_run_continues_from_its_newest_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    _trainer(run, data["train"], steps=3, checkpoints_total_limit=2).run()
    heads = {p.name: _tensors(p / "head.safetensors") for p in S.checkpoint_dirs(run)}
    assert list(heads) == ["step-0000002", "step-0000003"]
    assert not _same(heads["step-0000002"], heads["step-0000003"])  # checkpoints are told apart by their heads
    resumed = _trainer(run, data["train"], steps=4, checkpoints_total_limit=2, resume="latest")
    resumed.run()
    assert resumed.lines[0] == f"resuming from {run / 'checkpoints' / 'step-0000003'} at step 3"
    assert [r["step"] for r in _rows(run)] == ["1", "2", "3", "4"]
    assert training_metadata(run / "head.safetensors")["step"] == 4


# --------------------------------------------------------------------------- validation

def _rows(run: Path):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _scripted(trainer: Trainer, sads):
    """Validation SADs in call order (the selection logic is what is tested, not the SAD)."""
    sads = iter(sads)
    trainer.validate = lambda: next(sads)
    return trainer


def test_with_validation_the_run_head_is_the_best_not_the_last(tmp_path, data):
    run = tmp_path / "run"
    _scripted(_trainer(run, data["train"], data["val"], steps=3, val_every=1), [5.0, 2.0, 3.0, 4.0]).run()
    final = _tensors(run / "head.safetensors")
    assert _same(final, _tensors(run / "checkpoints" / "step-0000001" / "head.safetensors"))  # best: step 1
    assert not _same(final, _tensors(run / "checkpoints" / "step-0000003" / "head.safetensors"))
    meta = training_metadata(run / "head.safetensors")
    assert meta["step"] == 1 and meta["best_val_sad"] == {"sad": 2.0, "step": 1}
    assert _same(final, _tensors(run / "best.safetensors"))


def test_the_last_step_is_validated_when_steps_are_no_multiple_of_val_every(tmp_path, data):
    run = tmp_path / "run"
    _scripted(_trainer(run, data["train"], data["val"], steps=5, val_every=2, checkpoint_every=5),
              [9.0, 8.0, 7.0, 1.0]).run()
    assert [r["step"] for r in _rows(run) if r["val_sad"]] == ["0", "2", "4", "5"]
    assert training_metadata(run / "head.safetensors")["best_val_sad"] == {"sad": 1.0, "step": 5}


def test_validation_leaves_the_head_as_it_was(tmp_path, data):
    """Validation runs the head in inference mode: no BatchNorm statistic moves, and it stays in
    training mode for the steps after."""
    t = _trainer(tmp_path / "run", data["train"], data["val"])
    before = {k: v.clone() for k, v in t.head.state_dict().items()}
    sad = t.validate()
    assert sad > 0 and t.head.training
    assert all(torch.equal(v, t.head.state_dict()[k]) for k, v in before.items())
    assert t.validate() == sad  # fixed noise, references and resizing


def test_without_validation_the_run_head_is_the_last(tmp_path, data):
    run = tmp_path / "run"
    _trainer(run, data["train"], steps=3, checkpoint_every=2, warmup=4).run()
    assert [p.name for p in S.checkpoint_dirs(run)] == ["step-0000002", "step-0000003"]  # the last step always
    assert _same(_tensors(run / "head.safetensors"), _tensors(run / "checkpoints" / "step-0000003" / "head.safetensors"))
    # the authors' warm-up: lr x ((1 - 1e-6) / 4 * step + 1e-6) for step 0, 1, 2 (before the step's update)
    assert [float(r["lr"]) for r in _rows(run)] == pytest.approx([1e-9, 1e-3 * (0.25 + 0.75e-6), 1e-3 * (0.5 + 0.5e-6)],
                                                                 rel=1e-9)


# --------------------------------------------------------------------------- features

def test_the_reference_gets_its_own_noise_as_at_inference(tmp_path, data):
    """Inference draws a reference's noise from REFERENCE_NOISE and a target's from TARGET_NOISE
    (pipeline.encode_reference / match); training must too, seeded by the sample's position."""
    t = _trainer(tmp_path / "run", data["train"], seed=7)
    batch = {k: torch.stack([TrainSamples(data["train"], 128, 7)[p][k] for p in (5, 6)]) for k in
             ("image", "reference", "guidance", "position")}
    t.features(batch)
    seeds = [(7 << 40) + 5, (7 << 40) + 6]  # seed and position: fresh noise for every sample of the run
    assert seeds == [noise_seed(7, 5), noise_seed(7, 6)]
    assert t.extractor.calls == [(seeds[0], True, TARGET_NOISE), (seeds[0], False, REFERENCE_NOISE),
                                 (seeds[1], True, TARGET_NOISE), (seeds[1], False, REFERENCE_NOISE)]
    assert (TARGET_NOISE, REFERENCE_NOISE) == (0, 1)


# --------------------------------------------------------------------------- objective

def test_batchnorm_runs_per_pair_and_only_the_first_pair_updates_its_running_statistics(data):
    """The authors' BatchNorm is per GPU (2 samples) and DDP keeps rank 0's running statistics: a
    batch of 4 predicts what its two pairs predict apart, and leaves the statistics the first pair
    alone leaves."""
    t = _trainer(Path("unused"), data["train"])
    batch = {k: torch.stack([TrainSamples(data["train"], 128, 42)[p][k] for p in range(4)]) for k in
             ("image", "reference", "guidance", "position")}
    feats = t.features(batch)

    def part(i, j):
        tokens, corr, ups0, ups1, attn = feats
        return (tokens[i:j], corr[i:j], ups0[i:j], ups1[i:j], {r: a[i:j] for r, a in attn.items()}), batch["image"][i:j]

    heads = [tiny_head().train() for _ in range(3)]
    with torch.no_grad():
        whole = HeadStep(heads[0], 2)(*feats, batch["image"])
        first = HeadStep(heads[1], 2)(*part(0, 2)[0], part(0, 2)[1])
        second = HeadStep(heads[2], 2)(*part(2, 4)[0], part(2, 4)[1])
    torch.testing.assert_close(whole, torch.cat([first, second]), rtol=1e-5, atol=1e-6)
    stats = [{k: v for k, v in h.state_dict().items() if "running" in k} for h in heads]
    assert stats[0] and all(torch.equal(v, stats[1][k]) for k, v in stats[0].items())
    assert not all(torch.equal(v, stats[2][k]) for k, v in stats[0].items())


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    alpha = (torch.rand(n, 1, 64, 64, generator=g) * 3 - 1).clamp(0, 1)  # soft, with exact 0s and 1s
    alpha[1] = 0  # a constant alpha: LossFunction2's segmentation branch
    unknown = ((alpha > 0) & (alpha < 1)).float()
    pred = torch.rand(n, 1, 64, 64, generator=g).requires_grad_()
    return unknown, pred, alpha


def _grad(total, pred):
    (g,) = torch.autograd.grad(total, pred)
    return g


def test_a_step_of_four_takes_batchnorm_statistics_of_the_first_pair(tmp_path, data):
    """Trainer.run with a global batch of 4 on one process: the running statistics after the step
    are those a fresh head gets from the step's first pair alone (the authors' rank-0 GPU)."""
    t = _trainer(tmp_path / "run", data["train"], batch_size=4, steps=1, seed=3)
    t.run()
    samples = TrainSamples(data["train"], 128, 3)
    pair = {k: torch.stack([samples[p][k] for p in (0, 1)]) for k in ("image", "reference", "guidance", "position")}
    fresh = tiny_head().train()
    with torch.no_grad():
        HeadStep(fresh, 2)(*t.features(pair), pair["image"])
    expected = {k: v for k, v in fresh.state_dict().items() if "running" in k}
    assert expected and all(torch.equal(t.head.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("loss", ["recipe", "finetune"])
def test_the_objective_is_the_authors_two_gpu_loss_however_the_batch_is_split(loss):
    """The authors' 2 GPUs x 2: each GPU's loss on its pair, gradients averaged over the GPUs.
    One process with 4 samples and two processes with 2 (DDP averages their gradients) must both
    give exactly that."""
    unknown, pred, alpha = _batch()
    fn = L.LOSSES[loss]
    authors = sum(sum(fn(unknown[p], pred[p], alpha[p]).values()) for p in (slice(0, 2), slice(2, 4))) / 2
    one = sum(group_objective(fn, unknown, pred, alpha, 2).values())
    two = [sum(group_objective(fn, unknown[p], pred[p], alpha[p], 2).values()) for p in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(one, authors, rtol=1e-6, atol=0)
    torch.testing.assert_close((two[0] + two[1]) / 2, authors, rtol=1e-6, atol=0)
    g_authors = _grad(authors, pred)
    torch.testing.assert_close(_grad(one, pred), g_authors, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(_grad((two[0] + two[1]) / 2, pred), g_authors, rtol=1e-5, atol=1e-9)
    if loss == "finetune":  # the batch as one: another objective (the pooled region scales), so this test can tell
        whole = sum(fn(unknown, pred, alpha).values())
        assert abs(float(whole.detach()) - float(authors.detach())) > 1e-3 * abs(float(authors.detach()))


def test_the_objective_logs_every_term_also_for_a_constant_pair():
    unknown, pred, alpha = _batch()
    alpha[0] = 1  # both samples of the first pair constant: only the smooth-L1 term there
    terms = group_objective(L.recipe_losses, unknown, pred, alpha, 2)
    assert list(terms) == list(S.LOSS_TERMS)
    pair = L.recipe_losses(unknown[2:], pred[2:], alpha[2:])
    first = L.recipe_losses(unknown[:2], pred[:2], alpha[:2])
    assert list(first) == ["known_l1_loss"]
    torch.testing.assert_close(terms["unknown_l1_loss"], pair["unknown_l1_loss"] / 2)
    torch.testing.assert_close(terms["known_l1_loss"], (first["known_l1_loss"] + pair["known_l1_loss"]) / 2)


# --------------------------------------------------------------------------- validation values, resume of the best, a NaN

def test_validation_is_the_mean_sad_per_image_with_inferences_noise_seed(tmp_path, data, monkeypatch):
    """A head that predicts 0 everywhere: each image's SAD is its alpha's sum / 1000, and the validation SAD
    their mean over the validation images; every SD pass uses inference's seed 0."""
    from iconmatting_core.training import trainer as T

    class Zero:
        def __init__(self, head, group):
            pass

        def __call__(self, tokens, corr, ups0, ups1, attention, images):
            return torch.zeros(images.shape[0], 1, *images.shape[-2:])

    t = _trainer(tmp_path / "run", data["train"], data["val"], seed=7)
    monkeypatch.setattr(T, "HeadStep", Zero)
    samples = TrainSamples(data["val"], t.config.image_size, 7, fixed=True)
    sads = [float(samples[p]["alpha"].sum()) / 1000 for p in range(len(samples))]
    assert len(sads) == 2 and sads[0] != sads[1]
    assert t.validate() == pytest.approx(sum(sads) / 2, rel=1e-6)
    assert {seed for seed, _, _ in t.extractor.calls} == {0}


def test_a_resumed_run_keeps_the_best_head_of_before_the_resume(tmp_path, data):
    """Validation 5, 2, 3 at steps 0-2; resumed, step 3 scores 4: the best is still step 1's head."""
    run = tmp_path / "run"
    _scripted(_trainer(run, data["train"], data["val"], steps=2, val_every=1), [5.0, 2.0, 3.0]).run()
    _scripted(_trainer(run, data["train"], data["val"], steps=3, val_every=1, resume="latest"), [4.0]).run()
    assert training_metadata(run / "head.safetensors")["best_val_sad"] == {"sad": 2.0, "step": 1}
    assert _same(_tensors(run / "head.safetensors"), _tensors(run / "checkpoints" / "step-0000001" / "head.safetensors"))


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, data):
    t = _trainer(tmp_path / "run", data["train"], steps=3)
    t.loss_fn = lambda unknown, pred, alpha: {"unknown_l1_loss": pred.sum() * float("nan")}
    with pytest.raises(TrainingStopped, match=r"loss nan at step 1 \(NaN or above 10000\): training stopped; no checkpoint"):
        t.run()


def test_when_no_step_beats_the_initial_head_the_run_head_is_step_0s(tmp_path, data):
    """Validation 1, 2, 3 at steps 0-2: the best is the head before any step, and its metadata says step 0."""
    run = tmp_path / "run"
    _scripted(_trainer(run, data["train"], data["val"], steps=2, val_every=1), [1.0, 2.0, 3.0]).run()
    meta = training_metadata(run / "head.safetensors")
    assert meta["step"] == 0 and meta["best_val_sad"] == {"sad": 1.0, "step": 0}
