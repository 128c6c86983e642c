"""What the host tests' prompts share: the shipped API workflows with the tiny head, the input files they read,
the tiny models' names and folders (used by tests/host/test_comfy_pack.py and tests/host/test_train_comfy.py)."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from comfy_harness import link_file

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
TINY_SD2_PACK = ROOT / "tests" / "support" / "comfy_tiny_sd2"
SD_FILE = "v2-1_768-ema-pruned.safetensors"
HEAD_FILE = "icm.safetensors"  # the tiny head carries its (tiny) config, which only our .safetensors can
BATCH = "Matte a folder of photos (IconMatting).json"
COMPOSITE = "Cut out and composite (IconMatting).json"
TARGET_SIZES = [(100, 72), (60, 50)]  # (W, H): a set of photos of different sizes
#: a folder with subfolders: two photos at its top, one x.png in each of two subfolders
NESTED = {"top1.png": (40, 30), "top2.png": (36, 36), "a/x.png": (50, 20), "b/x.png": (24, 44)}
BACKGROUND_SIZES = [(80, 60), (30, 90), (64, 64)]


def combo_options(spec):
    """A combo input's options in object_info: V1 ``[[...], {...}]``, V3 ``["COMBO", {"options": [...]}]``."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def tiny_head_config():
    from tiny_models import tiny_config

    return tiny_config(unet_feature_channels=(128, 128))  # the up-block channels of the tiny comfy SD 2.x UNet


def make_models(models: Path, checkpoint: Path) -> Path:
    """models/checkpoints/<SD 2.1 name> (``checkpoint``: the tiny SD 2.x single file) + models/iconmatting/icm.safetensors."""
    from tiny_models import save_tiny_head

    link_file(models / "checkpoints" / SD_FILE, checkpoint)
    save_tiny_head(models / "iconmatting" / HEAD_FILE, tiny_head_config())
    return models


def write_inputs(input_dir: Path) -> None:
    rng = np.random.default_rng(0)
    input_dir.mkdir(parents=True, exist_ok=True)
    ref = (rng.random((96, 128, 4)) * 255).astype(np.uint8)
    ref[..., 3] = 255
    ref[20:80, 30:100, 3] = 0  # mask editor convention: painted (transparent) = mask 1
    Image.fromarray(ref, "RGBA").save(input_dir / "iconmatting_reference.png")
    (input_dir / "iconmatting_targets").mkdir(exist_ok=True)
    for i, (w, h) in enumerate(TARGET_SIZES, 1):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_targets" / f"photo_{i}.png")
    Image.fromarray((rng.random((72, 100, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_target_1.png")
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(input_dir / "iconmatting_background.png")
    for name, (w, h) in NESTED.items():
        (input_dir / "nested" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(input_dir / "nested" / name)
    (input_dir / "backgrounds").mkdir(exist_ok=True)
    for i, (w, h) in enumerate(BACKGROUND_SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(input_dir / "backgrounds" / f"bg_{i}.png")


def load_api(name):
    prompt = json.loads((WORKFLOWS / "api" / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "IconMattingLoad":
            node["inputs"]["matting_model"] = HEAD_FILE
    return prompt


def node_id(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)
