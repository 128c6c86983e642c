"""SD 2.1 out of the box: found in a Hugging Face cache layout, downloaded file by file, or named
exactly when missing offline (no network used: the cache is built here from the tiny model)."""
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import make_reference, make_targets
from iconmatting_core.__main__ import main
from iconmatting_core.hub import SD_FILES, SD_REPO_ID, SDNotFoundError, find_or_download_sd

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


def test_online_downloads_only_the_missing_files(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    have = [f for f in SD_FILES if not f.startswith("text_encoder/")]
    snapshot = build_cache(tmp_path / "cache", tiny_dir / "sd", have)
    asked = []

    def fake_download(repo_id, filename, cache_dir=None, **kwargs):
        assert repo_id == SD_REPO_ID and cache_dir == str(tmp_path / "cache")
        asked.append(filename)
        dst = snapshot / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_dir / "sd" / filename, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert find_or_download_sd() == snapshot
    assert asked == ["text_encoder/config.json", "text_encoder/model.safetensors"]

    def no_network(*args, **kwargs):
        raise ConnectionError("no route to host")

    shutil.rmtree(snapshot / "text_encoder")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(SDNotFoundError, match="download failed: ConnectionError: no route to host.*text_encoder/config.json"):
        find_or_download_sd()
