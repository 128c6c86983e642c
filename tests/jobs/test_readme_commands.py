"""The documentation's commands are tests: every command of README.md and web/docs runs here as written.

The commands come from the documents themselves (``readme_commands``: which files, which lines, how each
placeholder is filled); no test names a command, so one added to the README is run without a new test,
and one the harness cannot map fails with a message saying what to add to its tables.

How each runs:

* in a sandbox folder where every input has the name the README gives it (``ref.jpg``, ``photos/``,
  ``icm.ckpt``, ``v2-1_768-ema-pruned.safetensors``, ``datasets/ICM57``...), made from the fixtures below:
  tiny random-weight models in the real layouts (the authors' Lightning ``icm.ckpt``; our
  ``.safetensors``; SD 2.1 as a tiny diffusers folder under the single file's name, which ``--sd``
  accepts), generated images, masks, a clip, data sets in the layouts the README describes. Commands
  without model options find them where the README says: ``~/.cache/iconmatting/models/icm.ckpt`` and
  the Hugging Face cache (``HOME`` is the run's own, ``HF_HUB_OFFLINE=1``: no network here);
* ``python``, ``torchrun`` are this venv's; ``iconmatting`` is a wrapper of pyproject's console script;
  ``python -m iconmatting_core`` finds the package on ``PYTHONPATH`` (as installed), the launcher
  ``custom_nodes/comfyui-iconmatting/iconmatting.py`` (a link to this checkout) without it;
* in the documented environment: the tiny models' architecture stands in for the released one, and
  packages the venv has but ``requirements-cli.txt`` and the extras do not (transformers, scipy) are
  hidden (``tests/support/readme_site``);
* ``python ...`` commands start in a warm interpreter (``tests/support/warm_python.py``: torch and
  diffusers imported once, each command a fresh fork with the interpreter's own ``-m``/script semantics;
  ~4 s of CPU saved per command); commands that start processes of their own (torchrun's ranks, a local
  Ray) start as new processes;
* twice, at the same time: stdout and stderr on a pseudo-terminal (tqdm's bar) and redirected to files
  (plain progress lines), each in its own sandbox; ``OMP_NUM_THREADS=1`` so the two share 2 cores.

Checked per command: the exit status; what the README says it writes (each ``<name>_alpha.png`` and
``_rgba.png`` at its photo's size, clip outputs per ``--video-out``, a context file that loads, a head
equal to the converted one, the eval table's rows and ``--out`` files, ``metrics.csv``); no traceback;
progress shown both ways; no ``\\r`` in a redirected log; no process left behind. A defect found here in
code another change owns is listed in ``KNOWN_DEFECTS`` (the check then asserts it is still there).

``train ... --steps 20000`` runs as written and is interrupted as a user would: once its first training
step is in ``metrics.csv``, SIGINT goes to its process group (Ctrl-C); it must exit 130 with the one-line
message and keep its run folder, and the README's next line (``...same arguments... --resume latest``)
must then start from that folder (a checkpoint found there is resumed from). torchrun's 4 gloo
processes run likewise (~30 s to their first step on a loaded 2-core machine); torchrun's own launcher
answers Ctrl-C with its ``SignalException`` traceback, the only traceback allowed.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
from PIL import Image

import readme_commands as R
from documented_env import HIDDEN, SITE, documented_env
from warm_python import WarmProcess

ROOT = R.ROOT
PLANS = R.plans()
RUNNABLE = [p for p in PLANS if (p.runs and not p.same_as) or p.error]
PYTHON_BLOCKS = [p for p in PLANS if p.python]
STEP_TIMEOUT = 420  # s; a hung command fails instead of blocking the suite
HF_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
INTERRUPTED = "interrupted; re-run the same command to resume"
TORCHRUN_CTRL_C = "torch.distributed.elastic.multiprocessing.api.SignalException"

#: The documented command-line environment: requirements-cli.txt, requirements-ray.txt, the [video] extra, torch.
DOCUMENTED_ENV = ["requirements-cli.txt", "requirements-ray.txt", "av", "torch"]


def _distributions_needed(names) -> set:
    """Normalised names of the installed distributions that ``names`` (requirement strings) need, transitively."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen: Dict[str, set] = {}
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen and set(req.extras) <= seen[key]:
            continue
        seen.setdefault(key, set()).update(req.extras)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if not r.marker or any(r.marker.evaluate({"extra": e}) for e in seen[key] | {""}):
                todo.append(r)
    return set(seen)


def _requirement_lines(name: str) -> List[str]:
    """The requirements of a requirements file (following ``-r``), or ``name`` itself when it is one."""
    if not name.endswith(".txt"):
        return [name]
    out = []
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        out += _requirement_lines(line[3:].strip()) if line.startswith("-r ") else [line] if line else []
    return out


# --------------------------------------------------------------------------- fixtures: what the README's paths stand for

#: photos/ (mirrored under --out: README "Names never change as a job grows"): path -> (output name, (w, h))
PHOTOS = {"a.jpg": ("a", (80, 60)), "b.png": ("b", (64, 48)), "trip/c.jpg": ("trip/c", (56, 40))}
#: manifest.txt lists these, relative to its folder; outputs are named by stem
MANIFEST = ["photos/a.jpg", "photos/trip/c.jpg"]
CLIP_FRAMES, CLIP_SIZE = 6, (64, 48)


def _save_rgb(path: Path, w: int, h: int, seed: int):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


def _disc(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0.35 * h, 0.65 * h), rng.uniform(0.35 * w, 0.65 * w), rng.uniform(0.2, 0.3) * min(h, w)
    return np.clip((r - np.hypot(yy - cy, xx - cx)) / 3 + 0.5, 0, 1)


def _groups(root: Path, groups: int, per_group: int, seed: int) -> Path:
    """The training layout: DIR/<group>/images/*.png + DIR/<group>/alphas/*.png (README "Your data")."""
    for g in range(groups):
        for i in range(per_group):
            a = _disc(48, 64, seed * 100 + g * 10 + i)
            rng = np.random.default_rng(seed * 100 + g * 10 + i)
            img = a[..., None] * np.array([200, 60 + 80 * g, 40]) + (1 - a[..., None]) * rng.uniform(40, 160, (48, 64, 3))
            for sub, arr in (("images", img.astype(np.uint8)), ("alphas", (a * 255).astype(np.uint8))):
                (root / f"g{g}" / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / f"g{g}" / sub / f"{i:03d}.png")
    return root


#: datasets/ICM57: the evaluation layout (image/, alpha/, trimap/ and the sibling group json)
ICM57 = {"cat_1": "cat", "cat_2": "cat", "cat_3": "cat", "cup_1": "cup", "cup_2": "cup", "cup_3": "cup"}


def _icm57(root: Path) -> Path:
    data = root / "ICM57"
    records = {}
    for i, (name, cls) in enumerate(sorted(ICM57.items())):
        _save_rgb(data / "image" / f"{name}.jpg", 56, 48, seed=50 + i)
        a8 = np.round(_disc(48, 56, 50 + i) * 255).astype(np.uint8)
        (data / "alpha").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a8).save(data / "alpha" / f"{name}.png")
        (data / "trimap").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(a8 == 0, 0, np.where(a8 == 255, 255, 128)).astype(np.uint8)).save(data / "trimap" / f"{name}.png")
        records[name] = {"dataset_name": "ICM57", "class": cls, "sub_class": None, "HalfOrFull": "half",
                         "TransparentOrOpaque": "SO"}
    (root / "ICM57.json").write_text(json.dumps(records))
    return data


@dataclass
class World:
    """Everything made once per session: fixture sources, models, the runs' HOME, PATH and environment."""

    root: Path
    sources: Dict[str, List[tuple]]  # fixture -> [(source, where it goes given the README's path)]
    home: Path
    bin: Path
    tiny_release: str
    warm: str = ""  # the warm interpreter's socket (warm_python)

    def env(self, step: R.Step, token: str) -> dict:
        env = self.base_env(token)
        # scripts run by path (the launcher) must find the package themselves; the rest as if installed
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in self.python_path(step))
        return env

    @staticmethod
    def python_path(step: R.Step) -> List[Path]:
        return [SITE] + ([] if step.launcher in ("launcher", "script") else [ROOT])

    def base_env(self, token: str) -> dict:
        drop = {"PYTHONPATH", "ICONMATTING_MODELS", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                "XDG_CACHE_HOME", "RAY_ADDRESS", "PYTHONSTARTUP", "COLUMNS", "LINES", "TQDM_DISABLE"}
        env = documented_env({**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(ROOT)})
        env.update(HOME=str(self.home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), str(self.bin), os.environ.get("PATH", "")]),
                   ICONMATTING_TINY_RELEASE=self.tiny_release, ICONMATTING_README_RUN=token, TERM="xterm")
        return env

    def materialise(self, fixture: str, at: Path) -> None:
        """Put ``fixture`` at ``at`` (the README's path) unless something is already there (made by an
        earlier command of the block, e.g. encode's context)."""
        for source, where in self.sources[fixture]:
            dst = where(at)
            if dst.exists() or dst.is_symlink():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if fixture == "sd":  # 16 MB of read-only weights: linked, not copied
                dst.symlink_to(source, target_is_directory=True)
            elif source.is_dir():
                shutil.copytree(source, dst)
            else:
                shutil.copy2(source, dst)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from iconmatting_core.__main__ import main
    from iconmatting_core.hub import SD_FILES, SD_REPO_ID
    from sample_inputs import make_reference, write_clip
    from tiny_models import save_tiny_head, save_tiny_sd_folder, tiny_config

    needed = _distributions_needed(r for f in DOCUMENTED_ENV for r in _requirement_lines(f))
    assert not needed & set(HIDDEN), f"the documented environment needs {needed & set(HIDDEN)}: do not hide them"
    root = tmp_path_factory.mktemp("readme")
    world = World(root, {}, root / "home", root / "bin", json.dumps(tiny_config().to_dict()))
    # the warm interpreter imports torch and diffusers while the fixtures are made
    world.warm = str(root / "warm.sock")
    warm_log = open(root / "warm.log", "wb")
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "warm_python.py"), world.warm],
                              env=world.base_env("warm-server"), stdin=subprocess.DEVNULL, stdout=warm_log,
                              stderr=warm_log, start_new_session=True, cwd=root)
    src = root / "src"
    sd = save_tiny_sd_folder(src / "sd", seed=0)
    save_tiny_head(src / "icm.ckpt", seed=0, layout="reference")  # the authors' Lightning layout, no config
    save_tiny_head(src / "icm.safetensors", seed=0)  # the same weights as `convert` writes them
    image, mask = make_reference()
    Image.fromarray((image.numpy() * 255).astype(np.uint8)).save(src / "ref.jpg", quality=95)
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(src / "ref_mask.png")
    for i, (name, (_, (w, h))) in enumerate(PHOTOS.items()):
        _save_rgb(src / "photos" / name, w, h, seed=10 + i)
    (src / "manifest.txt").write_text("".join(f"{p}\n" for p in MANIFEST))
    write_clip(src / "clip.mp4", frames=CLIP_FRAMES, width=CLIP_SIZE[0], height=CLIP_SIZE[1])
    _icm57(src / "datasets")
    _groups(src / "train", 2, 3, seed=1)
    _groups(src / "val", 2, 1, seed=2)
    # the context the README's later commands read: made by `encode` itself (in this process, from our
    # .safetensors of the same weights: the fingerprint is the weights', not the file's)
    encode = ["encode", "--reference", str(src / "ref.jpg"), "--mask", str(src / "ref_mask.png"), "--out",
              str(src / "ref_context.safetensors"), "--matting-weights", str(src / "icm.safetensors"), "--sd", str(sd),
              "--device", "cpu"]
    try:
        code = main(encode)
    except SystemExit as exc:
        code = exc.code
    assert code == 0, f"the fixture context: `python -m iconmatting_core {' '.join(encode)}` exited {code}"

    home = world.home  # the default model places of README "Model files"
    (home / ".cache" / "iconmatting" / "models").mkdir(parents=True)
    shutil.copy2(src / "icm.ckpt", home / ".cache" / "iconmatting" / "models" / "icm.ckpt")
    repo = home / ".cache" / "huggingface" / "hub" / ("models--" + SD_REPO_ID.replace("/", "--"))
    for name in SD_FILES:
        (repo / "snapshots" / HF_SNAPSHOT / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sd / name, repo / "snapshots" / HF_SNAPSHOT / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HF_SNAPSHOT)

    bin_dir = world.bin  # pyproject's console scripts, as pip would install them
    bin_dir.mkdir()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(R.CONSOLE_SCRIPTS), "readme_commands.CONSOLE_SCRIPTS must list pyproject's scripts"
    for name, target in scripts.items():
        module, func = target.split(":")
        (bin_dir / name).write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        (bin_dir / name).chmod(0o755)

    same = lambda at: at  # noqa: E731
    sources = {
        "reference_jpg": [(src / "ref.jpg", same)], "reference_mask": [(src / "ref_mask.png", same)],
        "photos": [(src / "photos", same)], "clip": [(src / "clip.mp4", same)],
        "manifest": [(src / "manifest.txt", same), (src / "photos", lambda at: at.parent / "photos")],  # what it lists
        "context": [(src / "ref_context.safetensors", same)],
        "authors_head": [(src / "icm.ckpt", same)], "head": [(src / "icm.safetensors", same)], "sd": [(sd, same)],
        "icm57": [(src / "datasets" / "ICM57", same),  # and its group json beside it (README: datasets/ICM57.json)
                  (src / "datasets" / "ICM57.json", lambda at: at.with_name(at.name + ".json"))],
        "train_groups": [(src / "train", same)], "val_groups": [(src / "val", same)],
    }
    assert set(sources) == set(R.INPUTS.values()), "every fixture of readme_commands.INPUTS is made here"
    world.sources = sources
    deadline = time.monotonic() + 300
    while not Path(world.warm).exists():
        assert server.poll() is None and time.monotonic() < deadline, (root / "warm.log").read_text()[-3000:]
        time.sleep(0.1)
    yield world
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    warm_log.close()


# --------------------------------------------------------------------------- running one command


@dataclass
class Result:
    step: R.Step
    tty: bool
    code: int
    out: str          # tty: everything the terminal showed; else stdout
    err: str          # tty: "" (one stream); else stderr
    interrupted: bool
    leftovers: List[str]
    cwd: Path
    seconds: float  # wall time of the command


def _until_first_step(cwd: Path, step: R.Step) -> Callable[[], bool]:
    """train: true once this run has appended a training step (a row with a loss) to its metrics.csv.
    The file may hold an earlier run's rows; the run rewrites it at its start (keeping the rows up to
    the step it resumes from), so the rows seen when it first changes are the base to grow from."""
    metrics = cwd / step.outputs.get("--out", "") / "metrics.csv"
    state = {"stamp": _stamp(metrics), "base": None}

    def ready() -> bool:
        stamp = _stamp(metrics)
        if stamp == state["stamp"]:
            return False
        with open(metrics, newline="") as f:
            rows = list(csv.DictReader(f))
        if state["base"] is None:
            state["base"] = len(rows)
            return False
        return len(rows) > state["base"] and bool(rows[-1].get("loss"))
    return ready


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


#: Commands that do not end by themselves in CI time and are interrupted as a user would (Ctrl-C): when.
INTERRUPT = {"train": _until_first_step}


def _processes_with(token: str) -> List[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"ICONMATTING_README_RUN={token}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _leftovers(token: str) -> List[str]:
    """Processes the command started and left running (after a grace period), killed here and reported."""
    deadline = time.monotonic() + 15
    while (pids := _processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = []
    for pid in pids:
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
            names.append(f"{pid} {cmdline.decode(errors='replace')}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return names


def _starts_processes(step: R.Step) -> bool:
    """Commands that start a group of Python processes of their own (torchrun's ranks, a local Ray)."""
    return step.launcher == "torchrun" or _values(step.args, "--engine") == ["ray"]


def _start(world: World, step: R.Step, cwd: Path, env: dict, stdio):
    """Start the command: ``python ...`` (and the console script, a python script) in the warm
    interpreter, except those that start processes of their own (Ray's driver hangs when forked from
    the warm interpreter); those and torchrun as new processes. Either way in a new session."""
    if (step.argv[0] in R.PYTHONS or step.argv[0] in R.CONSOLE_SCRIPTS) and not _starts_processes(step):
        argv = ["python", str(world.bin / step.argv[0]), *step.argv[1:]] if step.argv[0] in R.CONSOLE_SCRIPTS else step.argv
        with open(os.devnull, "rb") as null:
            fds = [null.fileno() if fd == subprocess.DEVNULL else fd for fd in stdio]
            return WarmProcess(world.warm, argv, cwd, env, world.python_path(step), fds)
    return subprocess.Popen(step.argv, cwd=cwd, env=env, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2],
                            start_new_session=True)


def run_step(world: World, step: R.Step, sandbox: Path, tty: bool, log: Path) -> Result:
    cwd = sandbox / step.cwd
    cwd.mkdir(parents=True, exist_ok=True)
    if step.launcher == "launcher":
        link = cwd / R.LAUNCHERS[step.script]
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ROOT, target_is_directory=True)
    for rel, fixture in step.inputs.items():
        world.materialise(fixture, cwd / rel)
    token = uuid.uuid4().hex
    env = {**world.env(step, token), **step.env}
    started = time.monotonic()
    chunks: List[bytes] = []
    if tty:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        proc = _start(world, step, cwd, env, (subprocess.DEVNULL, slave, slave))
        os.close(slave)

        def read():
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
    else:
        out_f, err_f = open(log.with_suffix(".stdout"), "wb"), open(log.with_suffix(".stderr"), "wb")
        proc = _start(world, step, cwd, env, (subprocess.DEVNULL, out_f.fileno(), err_f.fileno()))
    interrupt = INTERRUPT.get(step.subcommand)
    ready = interrupt(cwd, step) if interrupt else None
    interrupted, deadline = False, time.monotonic() + STEP_TIMEOUT
    while proc.poll() is None:
        if ready is not None and not interrupted and ready():
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
            interrupted = True
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            left = _leftovers(token)
            pytest.fail(f"{step.ref}: `{' '.join(step.argv)}` still running after {STEP_TIMEOUT} s (also killed: {left})")
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its process group: whatever it forked and did not reap
    except ProcessLookupError:
        pass
    seconds = time.monotonic() - started
    left = _leftovers(token)
    if tty:
        reader.join(10)
        os.close(master)
        out, err = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"), ""
        log.with_suffix(".tty").write_text(out)
    else:
        out_f.close()
        err_f.close()
        out, err = (log.with_suffix(s).read_text(errors="replace") for s in (".stdout", ".stderr"))
    return Result(step, tty, proc.returncode, out, err, interrupted, left, cwd, seconds)


# --------------------------------------------------------------------------- what each command promises


def _values(args: List[str], option: str) -> List[str]:
    """The values written after ``option`` (up to the next option); [] when absent."""
    if option not in args:
        return []
    out = []
    for a in args[args.index(option) + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def _expected_matte(res: Result) -> Dict[str, Optional[tuple]]:
    """Output path (under --out) -> (mode, size) or None for a video file: README "Command line", "Videos"."""
    args = res.step.args
    expected: Dict[str, Optional[tuple]] = {}
    for target in _values(args, "--targets"):
        fixture = R.INPUTS.get(target.rstrip("/"))
        if fixture == "photos":
            pairs = PHOTOS.values()
        elif fixture == "manifest":
            pairs = [(Path(p).stem, PHOTOS[p.split("/", 1)[1]][1]) for p in MANIFEST]
        elif fixture == "clip":
            kinds = (_values(args, "--video-out") or ["alpha,rgba"])[0].split(",")  # README: default alpha,rgba
            if "alpha" in kinds:
                expected["clip_alpha.mp4"] = None
            if "rgba" in kinds:
                expected["clip_rgba.webm"] = None
            if "png" in kinds:
                expected.update({f"clip_frames/clip_{i:06d}.png": ("RGBA", CLIP_SIZE) for i in range(CLIP_FRAMES)})
            continue
        else:
            pytest.fail(f"{res.step.ref}: no expected outputs for matte target {target!r} (fixture {fixture}); "
                        f"add them to _expected_matte in {__file__}")
        for name, size in pairs:
            expected[f"{name}_alpha.png"] = ("L", size)
            expected[f"{name}_rgba.png"] = ("RGBA", size)
    return expected


def check_matte(res: Result, world: World):
    assert res.code == 0, res.step.ref
    out = res.cwd / res.step.outputs["--out"]
    expected = _expected_matte(res)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(expected) <= written, f"{res.step.ref}: missing outputs {sorted(set(expected) - written)}"
    assert not (out / "failures.jsonl").exists(), (out / "failures.jsonl").read_text()
    for name, spec in expected.items():
        if spec is None:
            import av

            with av.open(str(out / name)) as container:
                frames = sum(1 for _ in container.decode(video=0))
            assert frames == CLIP_FRAMES, f"{name}: {frames} frames"
            continue
        with Image.open(out / name) as im:
            assert (im.mode, im.size) == spec, f"{name}: {im.mode} {im.size}, expected {spec}"


def check_encode(res: Result, world: World):
    from iconmatting_core.context_file import load_context

    assert res.code == 0, res.step.ref
    context = load_context(res.cwd / res.step.outputs["--out"])  # checked in full: sha256, shapes, metadata
    assert context.tokens.shape[0] > 0


def check_convert(res: Result, world: World):
    from safetensors.torch import load_file

    assert res.code == 0, res.step.ref
    ours = load_file(str(res.cwd / res.step.outputs["#1"]))
    expected = load_file(str(world.sources["head"][0][0]))  # the same weights, saved in our layout by the tests
    assert set(expected) <= set(ours)
    for k, v in expected.items():
        assert ours[k].equal(v), k


def check_train(res: Result, world: World):
    run = res.cwd / res.step.outputs["--out"]
    if res.interrupted:
        if res.step.launcher != "torchrun":
            assert res.code == 130, f"{res.step.ref}: exit {res.code} after Ctrl-C (README: 130)"
        text = res.out + res.err
        assert INTERRUPTED in text, f"{res.step.ref}: no one-line message after Ctrl-C"
        with open(run / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("loss")]
        assert rows and all(np.isfinite(float(r["loss"])) for r in rows)
    else:
        assert res.code == 0, res.step.ref
        assert (run / "head.safetensors").is_file()


def check_eval(res: Result, world: World):
    assert res.code == 0, res.step.ref
    args = res.step.args
    protocols = _values(args, "--protocol") or ["project"]
    refs = _values(args, "--references") or ["1"]
    regions = _values(args, "--region") or ["default"]
    rows = re.findall(r"^(project|reference)\s+(\d+)\s+(all|unknown)\s+\d+\s+[\d.]+\s", res.out, re.M)
    runs = [(p, k) for p in protocols for k in (refs if p == "reference" else ["1"])]
    assert len(rows) == len(runs) * len(regions), f"{res.step.ref}: table rows {rows}"  # README: one row per run and region
    if "--out" in res.step.outputs:
        out = res.cwd / res.step.outputs["--out"]
        folders = [out] if len(runs) == 1 else [out / f"{p}-k{k}" for p, k in runs]
        for folder in folders:
            assert sorted(p.stem for p in folder.glob("*.png")) == sorted(ICM57), folder
            assert (folder / "metrics.csv").is_file()


CHECKS = {"matte": check_matte, "encode": check_encode, "convert": check_convert, "train": check_train,
          "eval": check_eval}

_TQDM_BAR = re.compile(r"\d+/\d+ \[\d\d:\d\d<")           # tqdm: "n/total [elapsed<remaining"
_PLAIN_LINE = re.compile(r"^\S.*: \d+/\d+ \(\d+%\), [\d.]+ \S+/s, ETA", re.M)  # Progress off a terminal
#: Subcommands the README promises progress for (README "Progress"; train shows the same).
PROGRESS = {"matte", "train"}


#: Defects these tests found in code another change owns: (which runs, which check, what is wrong). The
#: check then asserts the defect is still there, so the day it is fixed this fails and asks to drop the entry.
KNOWN_DEFECTS: List[tuple] = []


def _known(step: R.Step, tty: bool, check: str) -> Optional[str]:
    return next((why for applies, what, why in KNOWN_DEFECTS if what == check and applies(step, tty)), None)


def check_common(res: Result):
    step, text = res.step, res.out + res.err
    where = f"{step.ref} ({'terminal' if res.tty else 'redirected'})"
    assert not res.leftovers, f"{where}: left processes running: {res.leftovers}"
    tracebacks = text.count("Traceback (most recent call last)")
    allowed = text.count(TORCHRUN_CTRL_C) if step.launcher == "torchrun" and res.interrupted else 0
    assert tracebacks <= allowed, f"{where}: traceback in its output:\n{text[-4000:]}"
    expected = {130} if res.interrupted else {0}  # README: 130 on Ctrl-C
    if res.interrupted and step.launcher == "torchrun":
        expected = {res.code}  # torchrun's own status after Ctrl-C; its ranks are checked by check_train
    assert res.code in expected, f"{where}: exit status {res.code}, expected {expected}:\n{text[-3000:]}"
    if res.tty:
        if step.subcommand in PROGRESS and (known := _known(step, True, "progress bar")):
            assert not _TQDM_BAR.search(text), f"{where}: fixed, drop it from KNOWN_DEFECTS: {known}"
        elif step.subcommand in PROGRESS:
            assert _TQDM_BAR.search(text), f"{where}: no progress bar on a terminal:\n{text[-2000:]}"
    else:
        assert "\r" not in res.err, f"{where}: \\r in a redirected log"
        if step.subcommand in PROGRESS:
            assert _PLAIN_LINE.search(res.err), f"{where}: no plain progress line in a redirected log:\n{res.err[-2000:]}"


def _run_plan(world: World, plan: R.Plan, sandbox: Path, tty: bool) -> List[Result]:
    sandbox.mkdir(parents=True)
    results = []
    for i, step in enumerate(plan.runs):
        if step.subcommand not in CHECKS:
            pytest.fail(f"{step.ref}: no effect check for `{step.subcommand}`; add one to CHECKS in {__file__}")
        run_dir = sandbox / step.cwd / step.outputs.get("--out", "")
        resumable = "--resume" in step.args and any((run_dir / "checkpoints").glob("step-*"))
        res = run_step(world, step, sandbox, tty, sandbox.parent / f"{sandbox.name}-{i}")
        check_common(res)
        CHECKS[step.subcommand](res, world)
        if resumable:
            assert "resuming from" in res.out + res.err, f"{step.ref}: --resume latest did not resume"
        results.append(res)
    return results


def _param(plan: R.Plan):
    """A plan with a command that starts its own processes takes more than ~20 s: marked slow."""
    slow = any(_starts_processes(s) for s in plan.runs)
    what = "-".join(dict.fromkeys(("ray-" if _starts_processes(s) and s.launcher != "torchrun" else "") +
                                  (f"{s.launcher}-" if s.launcher in ("torchrun", "launcher") else "") + s.subcommand
                                  for s in plan.runs))
    return pytest.param(plan, id=f"{plan.id}-{what}" if what else plan.id, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("plan", [_param(p) for p in RUNNABLE])
def test_documented_command_runs_as_written(plan, world, tmp_path):
    if plan.error:
        pytest.fail(plan.error)
    with ThreadPoolExecutor(2) as pool:  # the terminal and the redirected run side by side
        jobs = [pool.submit(_run_plan, world, plan, tmp_path / name, tty) for name, tty in (("tty", True), ("file", False))]
        for job in jobs:
            job.result()


@pytest.mark.parametrize("plan", PYTHON_BLOCKS, ids=[p.id for p in PYTHON_BLOCKS])
def test_documented_python_runs_as_written(plan, world, tmp_path):
    inputs, names = R.python_block_needs(plan.id, plan.python)
    for rel, fixture in inputs.items():
        world.materialise(fixture, tmp_path / rel)
    for rel in ("ref.jpg", "ref_mask.png", "photos"):  # what the prelude reads for PYTHON_NAMES
        world.materialise(R.INPUTS[rel], tmp_path / rel)
    prelude = (
        "import numpy as np\nfrom pathlib import Path\nfrom PIL import Image\n"
        "def _load(p, mode):\n    return np.asarray(Image.open(p).convert(mode), dtype=np.float32) / 255\n"
        "ref_image = _load('ref.jpg', 'RGB')\nref_mask = _load('ref_mask.png', 'L')\n"
        "target_images = [_load(p, 'RGB') for p in sorted(Path('photos').rglob('*.*'))]\n"
    )
    (tmp_path / "readme_block.py").write_text(prelude + f"# --- {plan.id}, as written\n" + plan.python)
    step = R.Step(plan.id, "", "run", argv=["python", "readme_block.py"], launcher="python -m")
    res = run_step(world, step, tmp_path, False, tmp_path / "log")
    assert res.code == 0 and "Traceback" not in res.err, res.err[-3000:]


def _entry_points():
    """Each way the documents start a program of ours in the warm interpreter, once (by the words before
    the program's arguments)."""
    seen = {}
    for plan in RUNNABLE:
        for step in plan.runs:
            if not _starts_processes(step):
                seen.setdefault(tuple(step.argv[:len(step.argv) - len(step.args)]), step)
    return list(seen.values())


@pytest.mark.parametrize("step", _entry_points(), ids=lambda s: " ".join(s.argv[:len(s.argv) - len(s.args)]))
def test_each_entry_point_starts_in_a_fresh_interpreter(step, world, tmp_path):
    """The warm interpreter stands in for interpreter start-up; here each way of starting our programs
    there (``python -m iconmatting_core``, ``-m iconmatting_core.eval``, the launcher, ...) runs once as
    a new process, with ``--help`` (torchrun and Ray start theirs anew in their own tests)."""
    head = step.argv[:len(step.argv) - len(step.args)]
    cwd = tmp_path / step.cwd
    cwd.mkdir(parents=True, exist_ok=True)
    if step.launcher == "launcher":
        (cwd / R.LAUNCHERS[step.script]).parent.mkdir(parents=True, exist_ok=True)
        (cwd / R.LAUNCHERS[step.script]).symlink_to(ROOT, target_is_directory=True)
    done = subprocess.run([*head, "--help"], cwd=cwd, env=world.env(step, "help"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-3000:]
