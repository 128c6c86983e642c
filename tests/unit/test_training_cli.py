"""``python -m iconmatting_core train`` in this process, on a stand-in SD (train_helpers.use_fake_sd):
bad options refused before any model loads, runs known by what made them (never overwritten,
resumed only with their own settings, data by content, weights by fingerprint), the warnings.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iconmatting_core.__main__ import main
from iconmatting_core.checkpoint import load_head, training_metadata
from iconmatting_core.training.state import RUN_RECORD
from tiny_models import save_tiny_head, tiny_config
from train_helpers import FakeExtractor, make_groups, no_model_loads, use_fake_sd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def env(tmp_path):
    (tmp_path / "sd").mkdir()  # --sd names a folder; the stand-in SD reads nothing
    return {"data": make_groups(tmp_path / "data", 2, 2), "init": save_tiny_head(tmp_path / "init.safetensors"),
            "sd": tmp_path / "sd", "tmp": tmp_path}


def _argv(env, out, *more):
    return ["train", "--data", str(env["data"]), "--sd", str(env["sd"]), "--out", str(out), "--init", str(env["init"]),
            "--workers", "0", "--no-progress", "--batch-size", "2", "--checkpoint-every", "1", "--steps", "2", *more]


def _one_line(capsys, code, argv, *fragments):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def _trained(env, monkeypatch, capsys, out, *more):
    use_fake_sd(monkeypatch)
    assert main(_argv(env, out, *more)) == 0
    capsys.readouterr()
    return out


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("option, fragment", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--val-every", "0"], "--val-every must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a number above 0, got nan"),
    (["--lr", "inf"], "--lr must be a number above 0, got inf"),
    (["--lr", "-0.0004"], "--lr must be a number above 0, got -0.0004"),
    (["--lr", "0"], "--lr must be a number above 0, got 0.0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--trimap-radius", "-3"], "--trimap-radius must be >= 0, got -3"),
    (["--checkpoints-total-limit", "-1"], "--checkpoints-total-limit must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2**40)], "--seed must be between 0 and"),
    (["--device", "gpu"], "--device gpu: not a device name"),
    (["--device", "cuda"], "--device cuda: this torch build has no usable CUDA device"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_options_are_one_line_before_any_model_loads(env, capsys, monkeypatch, option, fragment):
    no_model_loads(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build
    _one_line(capsys, 2, _argv(env, env["tmp"] / "run", *option), fragment)


def test_out_that_is_a_file_is_refused_before_any_model_loads(env, capsys, monkeypatch):
    no_model_loads(monkeypatch)
    (env["tmp"] / "notes.txt").write_text("mine")
    _one_line(capsys, 2, _argv(env, env["tmp"] / "notes.txt"), "--out", "notes.txt is a file")
    assert (env["tmp"] / "notes.txt").read_text() == "mine"


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(env, capsys, monkeypatch):
    no_model_loads(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _one_line(capsys, 2, _argv(env, env["tmp"] / "run", "--batch-size", "3"),
              "--batch-size 3 (the global batch) does not split over 2 processes")


def test_a_timestep_out_of_range_is_refused_before_any_model_loads(env, capsys, monkeypatch, tmp_path):
    no_model_loads(monkeypatch)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_config().to_dict()))
    argv = [a for a in _argv(env, tmp_path / "run", "--timestep", "1000", "--config", str(tmp_path / "tiny.json"))]
    i = argv.index("--init")
    _one_line(capsys, 2, argv[:i] + argv[i + 2:], "timestep must be in [0, 1000), got 1000")


# --------------------------------------------------------------------------- run folders

def test_a_run_folder_is_never_trained_into_afresh(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    no_model_loads(monkeypatch)
    _one_line(capsys, 2, _argv(env, run), f"--out {run} already holds a training run", "--resume latest",
              "another --out")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_killed_run_is_not_restarted_either(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    (run / "head.safetensors").unlink()  # killed before its end: checkpoints, metrics.csv, run.json
    _one_line(capsys, 2, _argv(env, run), "already holds a training run (run.json, metrics.csv, checkpoints)")
    (run / "run.json").unlink()
    (run / "metrics.csv").unlink()
    _one_line(capsys, 2, _argv(env, run), "already holds a training run (checkpoints)")


def test_an_empty_folder_is_a_new_run(env, capsys, monkeypatch):
    (env["tmp"] / "run").mkdir()
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    assert (run / "head.safetensors").is_file()


def test_resume_refuses_changed_settings_and_lists_them(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    err = _one_line(capsys, 2, _argv(env, run, "--steps", "3", "--lr", "1e-3", "--batch-size", "4", "--seed", "7",
                                     "--loss", "recipe", "--warmup", "5", "--trimap-radius", "9", "--resume", "latest"),
                    "--resume latest: the run was made with other settings", "--batch-size 2 -> 4", "--lr 4e-05 -> 0.001",
                    "--warmup 250 -> 5", "--loss finetune -> recipe", "--seed 42 -> 7", "--trimap-radius 2 -> 9",
                    "--resume-with-changes", "another --out")
    assert "--steps" not in err  # running longer is no change of recipe
    assert training_metadata(run / "head.safetensors")["step"] == 2


def test_resume_with_changes_records_both_settings_with_their_steps(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    assert main(_argv(env, run, "--steps", "3", "--lr", "1e-3", "--resume", "latest", "--resume-with-changes")) == 0
    meta = training_metadata(run / "head.safetensors")
    history = meta["history"]
    assert [h["step"] for h in history] == [0, 2]
    assert [h["recipe"]["lr"] for h in history] == [4e-5, 1e-3] and history[1]["changed"] == ["--lr 4e-05 -> 0.001"]
    assert meta["settings"]["lr"] == 1e-3 and meta["step"] == 3
    assert json.loads((run / RUN_RECORD).read_text())["history"] == history
    assert main(_argv(env, run, "--steps", "4", "--lr", "1e-3", "--resume", "latest")) == 0  # the new settings now
    assert [h["step"] for h in training_metadata(run / "head.safetensors")["history"]] == [0, 2]


def test_resume_compares_data_by_content_not_by_folder_name(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    moved = shutil.copytree(env["data"], env["tmp"] / "moved")
    env["data"] = moved
    assert main(_argv(env, run, "--steps", "3", "--resume", "latest")) == 0  # the same files elsewhere
    capsys.readouterr()
    alpha = np.asarray(Image.open(moved / "g1" / "alphas" / "0.png")).copy()
    alpha[5, 5] ^= 4
    Image.fromarray(alpha).save(moved / "g1" / "alphas" / "0.png")
    shutil.copy(moved / "g0" / "images" / "0.png", moved / "g0" / "images" / "2.png")
    shutil.copy(moved / "g0" / "alphas" / "0.png", moved / "g0" / "alphas" / "2.png")
    _one_line(capsys, 2, _argv(env, run, "--steps", "4", "--resume", "latest"),
              "--data: 1 file(s) changed, 2 file(s) added (by content)")


def test_resume_compares_the_initial_head_by_its_weights(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(env["init"]), framework="pt") as f:  # the same weights in another file (other bytes)
        tensors, meta = {k: f.get_tensor(k) for k in reversed(list(f.keys()))}, f.metadata()
    env["init"] = env["tmp"] / "same-weights.safetensors"
    save_file(tensors, str(env["init"]), metadata={**meta, "note": "a copy"})
    assert main(_argv(env, run, "--steps", "3", "--resume", "latest")) == 0
    capsys.readouterr()
    env["init"] = save_tiny_head(env["tmp"] / "other.safetensors", seed=1)
    _one_line(capsys, 2, _argv(env, run, "--steps", "4", "--resume", "latest"), "--init: another head (by content)")


def test_resume_with_other_sd_weights_is_refused(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    use_fake_sd(monkeypatch, weights_seed=0, dtype=torch.bfloat16)  # the same weights in another precision
    assert main(_argv(env, run, "--steps", "3", "--resume", "latest")) == 0
    history = training_metadata(run / "head.safetensors")["history"]
    assert len(history) == 1 and history[0]["recipe"]["sd"] != training_metadata(run / "head.safetensors")["sd_fingerprint"]
    capsys.readouterr()
    use_fake_sd(monkeypatch, weights_seed=1)
    _one_line(capsys, 2, _argv(env, run, "--steps", "4", "--resume", "latest"), "--sd: other weights (by fingerprint)")
    assert main(_argv(env, run, "--steps", "4", "--resume", "latest", "--resume-with-changes")) == 0
    history = training_metadata(run / "head.safetensors")["history"]
    assert [h["step"] for h in history] == [0, 3] and history[1]["changed"] == ["--sd: other weights (by fingerprint)"]
    assert history[0]["recipe"]["sd"] != history[1]["recipe"]["sd"]


def test_resume_of_a_run_without_a_record_needs_the_explicit_flag(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    (run / RUN_RECORD).unlink()  # a run of an older version
    _one_line(capsys, 2, _argv(env, run, "--steps", "3", "--resume", "latest"), "has no run record",
              "--resume-with-changes")
    assert main(_argv(env, run, "--steps", "3", "--resume", "latest", "--resume-with-changes")) == 0


def test_a_finished_run_without_checkpoints_is_not_restarted(env, capsys, monkeypatch):
    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    shutil.rmtree(run / "checkpoints")
    _one_line(capsys, 2, _argv(env, run, "--resume", "latest"), "holds a finished head but no checkpoint")


# --------------------------------------------------------------------------- recipe

def test_timestep_is_recorded_in_the_head_and_used_for_the_features(env, capsys, monkeypatch):
    built = use_fake_sd(monkeypatch)
    run = env["tmp"] / "run"
    assert main(_argv(env, run, "--timestep", "0")) == 0
    assert built[-1].config.timestep == 0
    head, _ = load_head(run / "head.safetensors")
    assert head.config.timestep == 0 and load_head(env["init"])[0].config.timestep == 200
    capsys.readouterr()
    _one_line(capsys, 2, _argv(env, run, "--steps", "3", "--resume", "latest"), "timestep 0 -> 200")


def _eval_layout(root: Path) -> Path:
    groups = make_groups(root / "src", 1, 2, seed=3)
    for sub, folder in (("image", "images"), ("alpha", "alphas")):
        shutil.copytree(groups / "g0" / folder, root / "icm" / sub)
    (root / "icm" / "ICM57.json").write_text(json.dumps(
        {n: {"class": "animal", "sub_class": None, "HalfOrFull": "half"} for n in ("0", "1")}))
    return root / "icm"


def _warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_validation_on_the_evaluation_set_or_on_training_images_is_warned(env, capsys, monkeypatch):
    use_fake_sd(monkeypatch)
    icm = _eval_layout(env["tmp"])
    assert main(_argv(env, env["tmp"] / "a", "--steps", "1", "--val-data", str(icm))) == 0
    (line,) = _warnings(capsys)
    assert "--val-data" in line and "evaluation set" in line and "no longer held out" in line
    assert main(_argv(env, env["tmp"] / "b", "--steps", "1", "--val-data", str(env["data"]))) == 0
    (line,) = _warnings(capsys)
    assert "4 of the 4 --val-data images are also --data images" in line
    assert main(_argv(env, env["tmp"] / "c", "--steps", "1", "--val-data", str(make_groups(env["tmp"] / "v", 1, 2, seed=5)))) == 0
    assert _warnings(capsys) == []


def test_a_batchnorm_group_of_one_is_warned(env, capsys, monkeypatch):
    use_fake_sd(monkeypatch)
    assert main(_argv(env, env["tmp"] / "a", "--steps", "1", "--batch-size", "3")) == 0
    (line,) = _warnings(capsys)
    assert "--batch-size 3 gives each of 1 process(es) 3 samples" in line and "one group has 1 sample" in line
    assert main(_argv(env, env["tmp"] / "b", "--steps", "1", "--batch-size", "4")) == 0
    assert _warnings(capsys) == []


# --------------------------------------------------------------------------- the head's SD

def test_a_head_used_with_other_sd_weights_is_warned(env, capsys, monkeypatch):
    from iconmatting_core.context_file import other_sd_warning
    from iconmatting_core.job import model_files
    import iconmatting_core.pipeline as pipeline

    run = _trained(env, monkeypatch, capsys, env["tmp"] / "run")
    head = run / "head.safetensors"
    config = load_head(head)[0].config
    assert other_sd_warning(head, FakeExtractor(config, 0)) is None  # the weights it was trained with
    line = other_sd_warning(head, FakeExtractor(config, 1))
    assert line.startswith("head.safetensors was trained on other Stable Diffusion weights") and "\n" not in line
    assert other_sd_warning(env["init"], FakeExtractor(config, 1)) is None  # no training record: nothing to say

    class Pipe:  # what model_files.load gets from load_pipeline: the matte command's path
        model = type("M", (), {"extractor": FakeExtractor(config, 1)})()

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: Pipe())
    model_files.load(head, env["sd"])
    assert capsys.readouterr().err == f"warning: {line}\n"


def test_seed_0_is_accepted(env, monkeypatch, capsys):
    """--seed takes 0 .. MAX_SEED inclusive (the refusals of -1 and past the top are above)."""
    out = _trained(env, monkeypatch, capsys, env["tmp"] / "run", "--seed", "0")
    assert training_metadata(out / "head.safetensors")["settings"]["seed"] == 0
