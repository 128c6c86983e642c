"""Training speed and memory, as ratios measured in one run (not a test).

    python benchmarks/benchmark_train.py                                 # 768 px, CUDA, full-size random models
    python benchmarks/benchmark_train.py --mixed-precision bf16 --batch-size 2
    python benchmarks/benchmark_train.py --device cpu --image-size 128 --tiny --steps 3   # smoke mode (tests)

Full-size SD 2.1 UNet + VAE and the full head with random weights (same architecture and cost as
the real ones; no download), or ``--tiny`` random models. Runs the real training loop
(``iconmatting_core.training``) on a generated data set and prints steps/s, the split of a step
between waiting for data, the frozen SD feature pass and the head's forward + backward + optimizer
step, and peak memory (CUDA: max allocated; CPU: peak resident set above the start). The first
step (warm-up) is left out of the timings.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # tiny_models (--tiny)

from comfy_bench_script import PeakMemory  # noqa: E402

from iconmatting_core.config import IconMattingConfig, load_sd_config  # noqa: E402
from iconmatting_core.sd_features import SDFeatureExtractor  # noqa: E402
from iconmatting_core.matting_head import IconMattingHead  # noqa: E402
from iconmatting_core.pipeline import resolve_device  # noqa: E402
from iconmatting_core.training.data import load_train_data  # noqa: E402
from iconmatting_core.training.trainer import Trainer, TrainSettings  # noqa: E402

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_data(root: Path, images: int = 8, size=(600, 800)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: size[0], : size[1]]
    for i in range(images):
        a = np.clip((min(size) * 0.3 - np.hypot(yy - size[0] / 2, xx - size[1] / 2)) / 8 + 0.5, 0, 1)
        img = rng.uniform(0, 255, (*size, 3)).astype(np.uint8)
        for sub, arr in (("images", img), ("alphas", (a * 255).astype(np.uint8))):
            (root / f"g{i % 2}" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / f"g{i % 2}" / sub / f"{i}.png")
    return root


def build(args, device):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    if args.tiny:
        from tiny_models import tiny_config, tiny_unet_config, tiny_vae_config

        config = tiny_config(image_size=args.image_size)
        unet, vae = UNet2DConditionModel.from_config(tiny_unet_config()), AutoencoderKL.from_config(tiny_vae_config())
    else:
        config = IconMattingConfig(image_size=args.image_size)
        unet, vae = UNet2DConditionModel.from_config(load_sd_config("unet")), AutoencoderKL.from_config(load_sd_config("vae"))
    prompt = torch.randn(1, 77, unet.config.cross_attention_dim)
    dtype = DTYPES[args.mixed_precision]
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    extractor = SDFeatureExtractor(unet, vae, prompt, config).to(device)
    return extractor, IconMattingHead(config)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="tiny random models (smoke test)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = load_train_data(make_data(Path(tmp) / "data"))
        extractor, head = build(args, device)
        settings = TrainSettings(out=str(Path(tmp) / "run"), steps=args.steps + 1, batch_size=args.batch_size,
                                 checkpoint_every=10**9, workers=args.workers, warmup=0)
        trainer = Trainer(settings, data, extractor, head, device, log=lambda s: None, progress=False)
        # step 1 warms up; then time the rest
        settings.steps = 1
        trainer.run()
        settings.steps, settings.resume = args.steps + 1, "latest"
        trainer.timing = {k: 0.0 for k in trainer.timing}
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            trainer.run()
            total = time.perf_counter() - t0
    t = trainer.timing
    step = sum(t.values())
    kind = "tiny" if args.tiny else "full-size"
    print(f"torch {torch.__version__}; {kind} random models, {args.image_size}px, batch {args.batch_size}, "
          f"SD pass {args.mixed_precision if args.mixed_precision != 'no' else 'fp32'}, head fp32, device {device}")
    print(f"steps/s: {args.steps / total:.3f} ({total / args.steps:.3f} s/step over {args.steps} steps)")
    print("share of a step: " + ", ".join(f"{k} {v / step:.1%}" for k, v in
                                           (("data wait", t["data"]), ("SD features", t["sd"]), ("head fwd+bwd+step", t["head"]))))
    print(f"peak memory: {mem.extra / 2**20:.0f} MiB ({'max allocated' if device.type == 'cuda' else 'RSS'} above start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
