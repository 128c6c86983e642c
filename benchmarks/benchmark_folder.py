"""The folder path in ComfyUI against the command line, per image, on the same models and photos (not a test).

    python benchmarks/benchmark_folder.py                        # 4 and 20 photos of 200x150, 2 repeats
    python benchmarks/benchmark_folder.py --breakdown            # and where the ComfyUI time goes, per node

Boots the test ComfyUI (tests/support/comfy_harness.py, 0.28.2 unless --host) with tiny random-weight models (the tiny
SD 2.x single file ComfyUI's own Load Checkpoint reads, and a tiny matting head) and, inside that one process,
times alternately:

* the folder template (``workflows/api/Matte a folder of photos``: Load Image Folder -> Match Targets -> Remove
  Background -> Save, with its guidance previews), queued through ComfyUI's ``POST /prompt`` and run by its prompt
  worker; time from the history's ``execution_start`` to ``execution_success``;
* the command line's ``matte`` (``iconmatting_core.__main__.main``) over the same folder, on a pipeline built from
  the same single file (the tiny configs) and the same head, with ComfyUI's torch thread count.

Each path runs on a small and a large folder, the two paths alternating folder by folder (each first in every
other repeat); the per-image cost is the difference of the best times over the difference in photos, so loading the
models and encoding the reference (cached by ComfyUI after the first prompt, done again by every command) cancel
out, and a repeat slowed by another process on a shared machine does not count. Prints both per-image costs (and
every time measured) and their ratio (ComfyUI / command line), and with ``--breakdown`` the seconds per node type of
the large folder's ComfyUI prompts.
"""
from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "workflows" / "api" / "Matte a folder of photos (IconMatting).json"
SD_FILE = "v2-1_768-ema-pruned.safetensors"
HEAD_FILE = "icm.safetensors"


# --- outside ComfyUI: the models, the photos, the report ----------------------------------------------------
def _photo(seed: int, w: int, h: int):
    """A smooth random picture (a photo compresses like this, not like noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    return small.resize((w, h), Image.BICUBIC)


def prepare(work: Path, counts, repeats: int, size) -> dict:
    """models/ (tiny SD 2.x single file, tiny head) and input/ (the reference, its mask, one folder of photos
    per prompt) under ``work``; returns the script's args."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]
    import numpy as np
    from PIL import Image

    from tiny_models import save_tiny_head, tiny_config
    from tiny_sd2_checkpoint import save_tiny_comfy_sd2_checkpoint

    models, inputs = work / "models", work / "comfy" / "input"
    save_tiny_comfy_sd2_checkpoint(models / "checkpoints" / SD_FILE)
    save_tiny_head(models / "iconmatting" / HEAD_FILE, tiny_config(unet_feature_channels=(128, 128)))
    w, h = size
    ref = np.asarray(_photo(0, w, h).convert("RGBA")).copy()
    ref[h // 4: 3 * h // 4, w // 4: 3 * w // 4, 3] = 0  # the mask editor's convention: painted = transparent
    inputs.mkdir(parents=True)
    Image.fromarray(ref, "RGBA").save(inputs / "iconmatting_reference.png")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    Image.fromarray(mask).save(inputs / "mask.png")
    Image.fromarray(ref[..., :3]).save(inputs / "reference.png")
    folders = {}
    for name, n in [("warm", 2)] + [(f"r{r}_{n}", n) for r in range(repeats) for n in counts]:
        folder = inputs / name
        folder.mkdir()
        for i in range(n):
            _photo(1000 * len(folders) + i, w, h).save(folder / f"photo_{i:04d}.png")
        folders[name] = str(folder)
    return {"folders": folders, "counts": list(counts), "repeats": repeats, "work": str(work)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=4, help="photos in the small folder")
    p.add_argument("--large", type=int, default=20, help="photos in the large folder")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", default="200x150", help="photo size WxH")
    p.add_argument("--host", default="0.28.2", help="ComfyUI host of tests/support/comfy_harness.py")
    p.add_argument("--breakdown", action="store_true", help="also time each node type of the ComfyUI prompts")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]
    from comfy_harness import run_comfy

    size = tuple(int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="iconmatting-folder-bench-"))
    try:
        script_args = prepare(work, (args.small, args.large), args.repeats, size)
        script_args["breakdown"] = args.breakdown
        result = run_comfy(ROOT, [], models_dir=work / "models", work_dir=work / "comfy", pack_name="comfyui-iconmatting",
                           extra_packs=[ROOT / "tests" / "support" / "comfy_tiny_sd2"], host=args.host, timeout=7200,
                           scripts=[{"path": str(Path(__file__).resolve()), "args": script_args}])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    entry = result["scripts"][0]
    if entry.get("error") or "result" not in entry:
        print(entry.get("error") or result.get("stderr_tail", "")[-3000:], file=sys.stderr)
        return 1
    out = entry["result"]
    comfy, cli = out["per_image"]["comfy"], out["per_image"]["cli"]
    print(f"IconMatting folder path (ComfyUI {result.get('comfyui_version')}, {out['threads']} torch threads) vs the "
          f"command line: tiny models, {args.small} and {args.large} photos of {args.size}, {args.repeats} repeats")
    for name, label in (("comfy", "ComfyUI folder template"), ("cli", "command line matte")):
        times = "; ".join(f"{n} photos: {', '.join(f'{t:.1f}' for t in ts)} s" for n, ts in out["runs"][name].items())
        print(f"  {label + ':':<25} {out['per_image'][name]:.3f} s/image  ({times})")
    print(f"  ratio ComfyUI / command line: {comfy / cli:.2f}"
          + (f"  ({out['memory_short_passes']} passes split for want of free memory)" if out["memory_short_passes"] else ""))
    if args.breakdown:
        print("  ComfyUI, large folder, seconds per node type (all repeats): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(out["breakdown"].items(), key=lambda kv: -kv[1])))
    print(json.dumps(out))
    return 0


# --- inside ComfyUI (run_comfy's script) -----------------------------------------------------------------
def _execution_seconds(entry) -> float:
    """execution_start -> execution_success of a prompt, from the history's own timestamps (ms)."""
    execution = entry["execution"]
    if not execution or not execution["success"]:
        raise RuntimeError(f"the folder prompt failed: {json.dumps(entry)[:3000]}")
    stamps = {event: data["timestamp"] for event, data in execution["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


class NodeTimer:
    """Seconds spent in each node type's function (wraps the classes' entry points while timing)."""

    def __init__(self, seconds: dict):
        import nodes

        self.seconds, self.saved = seconds, []
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            if name.startswith("IconMatting") or name in ("SaveImage", "PreviewImage", "MaskToImage"):
                attr = "execute" if hasattr(cls, "define_schema") else cls.FUNCTION
                self._wrap(name, cls, attr)

    def _wrap(self, name, cls, attr):
        own = attr in cls.__dict__
        original = inspect.getattr_static(cls, attr)
        function = original.__func__ if isinstance(original, classmethod) else original
        timer = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - t

        setattr(cls, attr, classmethod(timed) if isinstance(original, classmethod) else timed)
        self.saved.append((cls, attr, original if own else None))

    def restore(self):
        for cls, attr, original in reversed(self.saved):
            if original is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, original)


def _cli_pipe(models: Path):
    """The command line's pipeline over the same single file and head (the tiny file needs its configs)."""
    import torch

    from iconmatting_core.checkpoint import load_head
    from iconmatting_core.pipeline import IconMattingPipeline, build_model
    from iconmatting_core.sd_loading import load_sd_components
    from tiny_sd2_checkpoint import tiny_comfy_sd2_configs

    head, prompt = load_head(models / "iconmatting" / HEAD_FILE)
    sd = load_sd_components(models / "checkpoints" / SD_FILE, torch.float32, **tiny_comfy_sd2_configs())
    return IconMattingPipeline(build_model(sd, head, prompt))


def run(ctx):
    import io
    from contextlib import redirect_stderr

    import torch

    for path in (str(ROOT), str(ROOT / "tests" / "support")):  # after ComfyUI's own modules
        if path not in sys.path:
            sys.path.append(path)
    from iconmatting_core.__main__ import main as cli_main

    a = ctx.args
    work, threads = Path(a["work"]), torch.get_num_threads()
    prompt = json.loads(TEMPLATE.read_text())
    loader = next(k for k, v in prompt.items() if v["class_type"] == "IconMattingLoadImageFolder")
    for node in prompt.values():
        if node["class_type"] == "IconMattingLoad":
            node["inputs"]["matting_model"] = HEAD_FILE
    pipe = _cli_pipe(Path(ctx.models_dir))
    ref, mask = work / "comfy" / "input" / "reference.png", work / "comfy" / "input" / "mask.png"

    memory_short = [0]  # passes the pack split for want of free memory (it says so in the log): a slower run

    def comfy(folder: str) -> float:
        prompt[loader]["inputs"]["folder"] = Path(folder).name
        entry = ctx.run_prompt(prompt)
        memory_short[0] += sum("noised copies run in groups" in line for line in entry["log"])
        return _execution_seconds(entry)

    def cli(folder: str) -> float:
        out = work / "cli" / Path(folder).name
        argv = ["matte", "--reference", str(ref), "--mask", str(mask), "--targets", folder, "--out", str(out),
                "--threads", str(threads)]
        t = time.perf_counter()
        with redirect_stderr(io.StringIO()):
            code = cli_main(argv, pipe_factory=lambda: pipe)
        seconds = time.perf_counter() - t
        if code != 0:
            raise RuntimeError(f"matte exited {code}")
        return seconds

    comfy(a["folders"]["warm"])  # loads the models and encodes the reference once
    cli(a["folders"]["warm"])
    small, large = a["counts"]
    runs = {path: {small: [], large: []} for path in ("comfy", "cli")}
    seconds = {}
    for r in range(a["repeats"]):  # the two paths alternate folder by folder, each first in every other repeat
        for n in (small, large):
            for path in (("comfy", "cli") if r % 2 == 0 else ("cli", "comfy")):
                timer = NodeTimer(seconds) if path == "comfy" and n == large and a.get("breakdown") else None
                try:
                    runs[path][n].append(round((comfy if path == "comfy" else cli)(a["folders"][f"r{r}_{n}"]), 3))
                finally:
                    if timer is not None:
                        timer.restore()
    torch.set_num_threads(threads)
    # best of the repeats for each folder (this kind of machine is shared: a slow repeat is someone else's load)
    per_image = {path: (min(t[large]) - min(t[small])) / (large - small) for path, t in runs.items()}
    out = {"threads": threads, "runs": runs, "per_image": per_image, "memory_short_passes": memory_short[0]}
    if seconds:
        out["breakdown"] = seconds
    return out


if __name__ == "__main__":
    sys.exit(main())
