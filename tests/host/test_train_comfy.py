"""A head trained by `iconmatting_core.training`, saved in models/iconmatting/, is offered by the Load
node of a real ComfyUI (0.3.75) and mattes in the shipped batch workflow (tiny models, a host job in the
ComfyUI boot all host tests share)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pack_prompts as pack
from comfy_harness import DEFAULT_HOST, comfy_job, host_job, link_file

TRAINED = "my_trained_head.safetensors"


def _train_tiny_head(models: Path, tmp: Path, checkpoint: Path) -> Path:
    from iconmatting_core.sd_features import SDFeatureExtractor
    from iconmatting_core.sd_loading import load_sd_components
    from tiny_models import tiny_head
    from tiny_sd2_checkpoint import tiny_comfy_sd2_configs
    from iconmatting_core.training.data import load_train_data
    from iconmatting_core.training.trainer import Trainer, TrainSettings

    ckpt = link_file(models / "checkpoints" / pack.SD_FILE, checkpoint)
    rng = np.random.default_rng(0)
    for i in range(2):
        a = np.zeros((64, 80), np.uint8)
        a[16:48, 20:60] = 255
        for sub, arr in (("images", (rng.random((64, 80, 3)) * 255).astype(np.uint8)), ("alphas", a)):
            (tmp / "data" / "g" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp / "data" / "g" / sub / f"{i}.png")
    sd = load_sd_components(ckpt, **tiny_comfy_sd2_configs())
    head = tiny_head(pack.tiny_head_config())
    extractor = SDFeatureExtractor(sd.unet, sd.vae, sd.empty_prompt_embedding, head.config)
    settings = TrainSettings(out=str(tmp / "run"), steps=1, batch_size=1, checkpoint_every=1, lr=1e-3, warmup=0)
    final = Trainer(settings, load_train_data(tmp / "data"), extractor, head, torch.device("cpu"),
                    log=lambda s: None, progress=False).run()
    (models / "iconmatting").mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(final, models / "iconmatting" / TRAINED))


@host_job(hosts=(DEFAULT_HOST,))
def trained_run(tmp_path, tiny_comfy_checkpoint):
    models = tmp_path / "models"
    _train_tiny_head(models, tmp_path, tiny_comfy_checkpoint)
    work = tmp_path / "work"
    pack.write_inputs(work / "input")
    prompt = pack.load_api(pack.BATCH)
    prompt[pack.node_id(prompt, "IconMattingLoad")]["inputs"]["matting_model"] = TRAINED
    return comfy_job(pack.ROOT, [prompt], models_dir=models, work_dir=work, pack_name="comfyui-iconmatting",
                     timeout=900, extra_packs=[pack.TINY_SD2_PACK], comfy_args=["--fp32-text-enc"])


@pytest.mark.slow  # trains a head (~15 s), then its prompt in the shared ComfyUI boot
def test_a_trained_head_is_offered_by_load_and_mattes_in_the_batch_workflow(trained_run):
    result = trained_run
    assert not result["pack"]["import_failed"]
    loader = result["pack"]["object_info"]["IconMattingLoad"]["input"]["required"]
    assert TRAINED in pack.combo_options(loader["matting_model"])
    run = result["prompts"][0]
    assert run["validation"]["ok"], run["validation"]
    assert run["execution"]["success"], run["execution"]["error"]
    alphas = sorted(f["image_size"] for f in run["new_files"] if Path(f["path"]).name.startswith("alpha"))
    assert alphas == sorted([w, h] for w, h in pack.TARGET_SIZES)
