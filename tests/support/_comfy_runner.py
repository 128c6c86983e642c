"""Subprocess side of ``comfy_harness``: boot a real ComfyUI headless once, run several jobs in it.

Usage: ``python _comfy_runner.py SPEC.json OUT_DIR`` with the ComfyUI root as cwd and the host's stand-ins
(``torchvision``, ``torchaudio``) on ``PYTHONPATH`` (``comfy_harness`` does both). SPEC holds ``comfy_root``,
``work_dir`` (ComfyUI's ``--base-directory`` for this boot), ``packs`` ([{``path``, ``name``}]: every custom node
folder any job needs, symlinked into ``custom_nodes/``), ``comfy_args`` (extra ComfyUI flags), ``cpu`` and
``jobs``. A job is what one ``run_comfy`` call runs: ``pack_name`` (the pack its report is about),
``extra_packs`` (names), ``models_dir`` (its models folder), ``input_dir`` and ``output_dir`` (its ComfyUI
input and output folders), ``prompts``, ``scripts`` ([{``path``, ``args``}]) and ``timeout`` (seconds).

ComfyUI is started the way its ``main.py`` starts it: ``sys.argv`` gets CPU flags, then ``main`` is
imported (argument parsing, path setup, prestartup scripts) and ``main.start_comfyui()`` builds
the ``PromptServer``, loads the built-in extra nodes and the custom nodes, and starts the real
prompt worker thread. The web server itself is never started.

Each job then sees ComfyUI as if it had been booted for it alone: ``work_dir/models`` (a symlink) is pointed
at the job's models folder and ComfyUI's input and output folders are set to the job's
(``folder_paths.set_input_directory``/``set_output_directory``, as ``main.py`` does for its flags), ComfyUI's
file-list cache is cleared, the pack is reported afresh (``object_info`` lists the job's models), and between
jobs every model is unloaded and the prompt worker's caches are reset (no node output of one job is reused by
another). ``temp/``, ``user/`` and the loaded node modules are shared.

OUT_DIR receives ``boot.json`` once ComfyUI has started (or failed to), ``job-<i>.started`` when job ``i``
begins and ``job-<i>.json`` when it ends, so the parent knows which job was running if the process dies. A
harness failure inside a job (a prompt that never finishes, the prompt worker dying) ends the process after
that job's file is written; the parent boots again for the jobs left.

``boot.json``: ``comfyui_version``, ``comfy_root``, ``fatal`` (traceback of a harness failure at start-up,
else null), ``timings`` (``startup_s``), ``startup_log`` (warning+ log lines of startup, deduplicated),
``builtin_import_failed`` (module paths of built-in extras ComfyUI could not import).

``job-<i>.json``:

* ``fatal`` (traceback of a harness failure in this job, else null), ``timings`` (``job_s``),
  ``folders`` (``base``, ``models_dir``, ``models_dir_resolved``, ``output_dir``, ``temp_dir``,
  ``input_dir``, ``folder_names_and_paths`` as {folder name: [paths]}).
* ``pack``: ``name``, ``path``, ``import_failed`` (what ComfyUI's ``load_custom_node`` returned,
  negated; ``None`` if it never tried), ``import_log`` (log lines while the pack loaded, e.g. the
  traceback), ``nodes`` (class names registered from the pack), ``display_names``,
  ``object_info`` ({name: the ``/object_info/{name}`` entry}), ``object_info_errors``.
* ``prompts``: one entry per prompt, in order:

  - ``index``, ``prompt_id``, ``duration_s``;
  - ``validation``: ``ok``, ``status`` (HTTP status of ``POST /prompt``: 200 or 400), ``error``
    and ``node_errors`` as ``/prompt`` returns them;
  - ``execution``: null if validation failed, else ``success``, ``status`` (``status_str``,
    ``completed``, ``messages`` from the history), ``error`` (the ``execution_error`` message:
    ``node_id``, ``node_type``, ``exception_message``, ``exception_type``, ``traceback``,
    ``current_inputs``, ...), ``interrupted``, ``outputs`` (history ui outputs per node id),
    ``meta``, ``node_outputs`` (``node_outputs[node_id][slot][i]`` summarises the i-th value of
    an output slot, e.g. ``{"type": "torch.Tensor", "shape", "dtype", "min", "max", "mean"}``),
    ``executed_nodes`` (node ids in the order ComfyUI sent ``executing``; cached nodes do not
    run again), ``events`` (``[event, data]`` sent to the client, minus the chatty
    ``progress_state`` and ``status``);
  - ``new_files``: files that appeared under ``output/`` or ``temp/`` (``path`` as
    ``output/...`` or ``temp/...``, ``size``, and for images ``image_size`` [w, h] and ``image_mode``);
  - ``models``: ``comfy.model_management.current_loaded_models`` after the prompt: ``count``,
    ``models`` (``patcher_class``, ``model_class``, ``device``, ``currently_used``),
    ``model_classes``;
  - ``log``: ComfyUI's log lines while the prompt ran (e.g. ``!!! Exception during processing``).
* ``extra_packs``: per extra pack of the job, ``name``, ``path``, ``import_failed``, ``import_log``.
* ``scripts``: per script, in order: ``path``, ``ok``, ``result`` (what ``run(ctx)`` returned),
  ``error`` (its traceback, else null), ``duration_s`` and ``log`` (log lines while it ran).
* ``models_after_unload_all``: the same as ``models``, after ``unload_all_models()`` at the job's end.

Scripts run in the main thread of the ComfyUI process after the job's prompts (the prompt worker is
idle then), so they see ComfyUI exactly as its nodes do: ``import comfy.sd``, ``import nodes``,
``folder_paths`` and the custom nodes' registrations (e.g. a model type an extra pack added). A
script is a Python file with ``run(ctx) -> dict`` (JSON-able; tensors are summarised); ``ctx`` is a
:class:`ScriptContext`. It may import anything on ``sys.path`` (ComfyUI's root first); a script
that needs this repository's packages appends the repository root itself.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
import threading
import time
import traceback
import types
import uuid
from pathlib import Path

CLIENT_ID = "comfy-harness"
_MAX_EVENTS = 500
# Client events too chatty to keep (full progress snapshots after every node, queue status).
_SKIPPED_EVENTS = {"progress_state", "status"}


class _LogCollector(logging.Handler):
    """Keeps every log record as a ``"LEVEL: message"`` line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        try:
            self.records.append(f"{record.levelname}: {record.getMessage()}")
        except Exception:  # a bad log call must not break the harness
            self.records.append(f"{record.levelname}: {record.msg!r}")


def _qualname(obj) -> str | None:
    if obj is None:
        return None
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(value, depth: int = 0):
    """A JSON-able summary of a node output value (tensors by shape/dtype/stats)."""
    import torch

    if isinstance(value, torch.Tensor):
        info = {"type": "torch.Tensor", "shape": list(value.shape), "dtype": str(value.dtype),
                "device": str(value.device)}
        if value.numel() and not value.is_complex():
            v = value.detach().float()
            info.update(min=v.min().item(), max=v.max().item(), mean=v.mean().item())
        return info
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth >= 4:
        return {"type": _qualname(value), "repr": repr(value)[:200]}
    if isinstance(value, dict):
        return {str(k): describe(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [describe(v, depth + 1) for v in value[:50]]
    return {"type": _qualname(value), "repr": repr(value)[:200]}


def _jsonable(obj):
    """``json.dumps`` default: tensors summarised, everything else ``repr``'d."""
    try:
        import torch
        if isinstance(obj, torch.Tensor):
            return describe(obj)
    except ImportError:
        pass
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def _prepare_work_dir(work: Path, packs: list) -> None:
    """Lay out ``work`` as ComfyUI's ``--base-directory``: every pack symlinked into ``custom_nodes/``;
    ``models`` is a symlink, pointed at each job's models folder in turn (:meth:`_Comfy.switch_to`)."""
    for sub in ("custom_nodes", "frontend", "output", "input", "temp", "user", "no_models"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    for pack in packs:
        link, target = work / "custom_nodes" / pack["name"], Path(pack["path"])
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=target.is_dir())
    _point(work / "models", work / "no_models")


def _point(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, replacing any earlier one in one rename."""
    if link.exists() and not link.is_symlink():
        raise RuntimeError(f"{link} exists and is not a symlink; cannot point it at {target}")
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def _list_files(*dirs: Path) -> dict:
    out = {}
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                out[str(p)] = p.stat().st_size
    return out


def _file_info(path: str, size: int, kind: str, folder: Path) -> dict:
    info = {"path": f"{kind}/{os.path.relpath(path, folder)}", "size": size}
    try:
        from PIL import Image
        with Image.open(path) as im:
            info["image_size"] = list(im.size)
            info["image_mode"] = im.mode
    except Exception:
        pass
    return info


class _Comfy:
    """Handles on a started ComfyUI: its modules, the PromptServer and the prompt worker."""

    def __init__(self, spec: dict, report: dict):
        self.spec, self.report = spec, report
        self.work = Path(spec["work_dir"])
        self.packs = {p["name"]: p["path"] for p in spec["packs"]}
        self.load_results: dict[str, bool] = {}
        self.executors: list = []
        self.events: list = []
        self.log = _LogCollector()
        self.import_logs: dict[str, list[str]] = {}
        self.scripts_run = 0

    # --- startup -------------------------------------------------------------------------
    def start(self) -> None:
        work = self.work
        _prepare_work_dir(work, self.spec["packs"])
        device = ["--cpu"] if self.spec.get("cpu", True) else []  # benchmarks/benchmark_gpu.py: the host's own device
        sys.argv = ["main.py", *device, "--base-directory", str(work),
                    "--front-end-root", str(work / "frontend"),
                    "--database-url", "sqlite:///:memory:",
                    "--disable-api-nodes", "--dont-print-server", *self.spec.get("comfy_args", [])]
        logging.getLogger().addHandler(self.log)
        t0 = time.perf_counter()

        import comfy.options
        comfy.options.enable_args_parsing()
        import main as comfy_main  # ComfyUI's main.py: parses args, sets paths, imports nodes
        import execution
        import nodes

        self.main = comfy_main
        self._instrument(nodes, execution)
        self.loop, self.server, _start_web = comfy_main.start_comfyui()
        self.report["timings"]["startup_s"] = round(time.perf_counter() - t0, 3)

        self.worker = next((t for t in threading.enumerate()
                            if getattr(t, "_target", None) is comfy_main.prompt_worker), None)
        original_send_sync = self.server.send_sync

        def recording_send_sync(event, data, sid=None):
            # "executing" is always kept: it marks node starts and the end of a prompt.
            keep = len(self.events) < _MAX_EVENTS or event == "executing"
            if keep and event not in _SKIPPED_EVENTS:
                # Binary events (previews, progress text) carry raw bytes: keep only their kind.
                self.events.append([event, data] if isinstance(event, str) else [repr(event), None])
            return original_send_sync(event, data, sid)

        self.server.send_sync = recording_send_sync
        self.report["startup_log"] = list(dict.fromkeys(  # warnings and errors, deduplicated
            r for r in self.log.records if r.split(":", 1)[0] in ("WARNING", "ERROR", "CRITICAL")))

    def _instrument(self, nodes, execution) -> None:
        """Record ``load_custom_node`` results and the prompt worker's ``PromptExecutor``."""
        original_load = nodes.load_custom_node
        harness = self

        async def recording_load_custom_node(module_path, *args, **kwargs):
            start = len(harness.log.records)
            ok = await original_load(module_path, *args, **kwargs)
            harness.load_results[os.path.abspath(module_path)] = ok
            harness.import_logs[os.path.abspath(module_path)] = harness.log.records[start:]
            return ok

        nodes.load_custom_node = recording_load_custom_node

        class RecordingPromptExecutor(execution.PromptExecutor):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                harness.executors.append(self)

        execution.PromptExecutor = RecordingPromptExecutor

    # --- ComfyUI's HTTP handlers, called in-process ------------------------------------------
    def call_route(self, method: str, path: str, match_info=None, body=None):
        """Call the handler of ``method path`` with a minimal request; return (status, json)."""
        from aiohttp import web

        for route in self.server.routes:
            if isinstance(route, web.RouteDef) and route.method == method and route.path == path:
                handler = route.handler
                break
        else:
            raise KeyError(f"ComfyUI has no route {method} {path}")

        async def json_body():
            return body

        # 0.28 reads request.headers (e.g. Comfy-Usage-Source) in POST /prompt: a client sending none.
        request = types.SimpleNamespace(match_info=match_info or {}, json=json_body, headers={}, query={},
                                        rel_url=types.SimpleNamespace(query={}))
        response = self.loop.run_until_complete(handler(request))
        return response.status, json.loads(response.text)

    # --- report parts ------------------------------------------------------------------------
    def pack_path(self, name: str) -> str:
        return os.path.abspath(self.work / "custom_nodes" / name)

    def pack_report(self, pack: str) -> dict:
        import nodes

        module = f"custom_nodes.{nodes.get_module_name(self.pack_path(pack))}"
        names = sorted(name for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
                       if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module)
        ok = self.load_results.get(self.pack_path(pack))
        info, errors = {}, {}
        for name in names:
            try:
                _, body = self.call_route("GET", "/object_info/{node_class}", {"node_class": name})
                info[name] = body.get(name)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
        return {
            "name": pack,
            "path": self.packs[pack],
            "import_failed": None if ok is None else not ok,
            "import_log": self.import_logs.get(self.pack_path(pack), []),
            "nodes": names,
            "display_names": {n: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n, n) for n in names},
            "object_info": info,
            "object_info_errors": errors,
        }

    def folders(self) -> dict:
        import folder_paths

        return {
            "base": str(self.work),
            "models_dir": folder_paths.models_dir,
            "models_dir_resolved": os.path.realpath(folder_paths.models_dir),
            "output_dir": folder_paths.get_output_directory(),
            "temp_dir": folder_paths.get_temp_directory(),
            "input_dir": folder_paths.get_input_directory(),
            "folder_names_and_paths": {k: list(v[0]) for k, v in
                                       folder_paths.folder_names_and_paths.items()},
        }

    def switch_to(self, job: dict) -> None:
        """Give ``job`` ComfyUI's models, input and output folders as its own; nothing of an earlier
        job stays loaded or cached."""
        import comfy.model_management as mm
        import folder_paths

        mm.unload_all_models()
        for executor in self.executors:  # the worker is idle between jobs: its next prompt starts afresh
            executor.reset()
        _point(self.work / "models", Path(job["models_dir"]))
        for kind in ("input", "output"):
            Path(job[f"{kind}_dir"]).mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(job["input_dir"])
        folder_paths.set_output_directory(job["output_dir"])
        folder_paths.filename_list_cache.clear()

    @staticmethod
    def loaded_models() -> dict:
        import comfy.model_management as mm

        models = []
        for lm in list(mm.current_loaded_models):
            patcher = lm.model
            models.append({
                "patcher_class": _qualname(patcher),
                "model_class": _qualname(getattr(patcher, "model", None)),
                "device": str(lm.device),
                "currently_used": getattr(lm, "currently_used", None),
            })
        return {"count": len(models), "models": models,
                "model_classes": [m["model_class"] for m in models]}

    # --- prompts -------------------------------------------------------------------------
    def run_prompt(self, index: int, item: dict, deadline: float) -> dict:
        body = dict(item) if _is_request_body(item) else {"prompt": item}
        body.setdefault("client_id", CLIENT_ID)
        prompt_id = str(body.setdefault("prompt_id", str(uuid.uuid4())))
        entry = {"index": index, "prompt_id": prompt_id, "validation": None, "execution": None}
        dirs = {kind: Path(self._folder(kind)) for kind in ("output", "temp")}
        before = _list_files(*dirs.values())
        self.events.clear()
        log_start = len(self.log.records)
        t0 = time.perf_counter()

        status, response = self.call_route("POST", "/prompt", body=body)
        entry["validation"] = {"ok": status == 200, "status": status,
                               "error": response.get("error"),
                               "node_errors": response.get("node_errors", {})}
        if status == 200:
            history = self._wait_for_history(prompt_id, deadline)
            entry["execution"] = self._execution_report(prompt_id, body["prompt"], history)

        entry["duration_s"] = round(time.perf_counter() - t0, 3)
        entry["log"] = self.log.records[log_start:]
        after = _list_files(*dirs.values())
        entry["new_files"] = [_file_info(p, size, *self._kind_of(p, dirs)) for p, size in sorted(after.items())
                              if before.get(p) != size]
        entry["models"] = self.loaded_models()
        return entry

    @staticmethod
    def _kind_of(path: str, dirs: dict):
        return next((kind, folder) for kind, folder in dirs.items() if Path(path).is_relative_to(folder))

    @staticmethod
    def _folder(kind: str) -> str:
        import folder_paths
        return folder_paths.get_directory_by_type(kind)

    def _wait_for_history(self, prompt_id: str, deadline: float) -> dict:
        """Wait until the prompt worker has finished ``prompt_id``; return its history entry."""
        done_event = ["executing", {"node": None, "prompt_id": prompt_id}]
        history = {}
        while True:
            if prompt_id not in history:
                history = self.server.prompt_queue.get_history(prompt_id=prompt_id)
            # The worker sends "executing" with node None right after storing the history.
            if prompt_id in history and done_event in self.events:
                return history[prompt_id]
            if self.worker is not None and not self.worker.is_alive():
                raise RuntimeError("ComfyUI's prompt worker thread died (see stderr)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish in time")
            time.sleep(0.01)

    def _execution_report(self, prompt_id: str, prompt: dict, history: dict) -> dict:
        try:  # the JSON that GET /history/{prompt_id} would return
            _, body = self.call_route("GET", "/history/{prompt_id}", {"prompt_id": prompt_id})
            history = body[prompt_id]
        except Exception as exc:  # e.g. a ui output ComfyUI itself cannot serialise
            history = dict(history, history_route_error=f"{type(exc).__name__}: {exc}")
        status = history.get("status") or {}
        messages = status.get("messages") or []
        error = next((data for event, data in messages if event == "execution_error"), None)
        interrupted = next((data for event, data in messages if event == "execution_interrupted"), None)
        return {
            "success": status.get("status_str") == "success",
            "status": status,
            "error": error,
            "interrupted": interrupted,
            "outputs": history.get("outputs", {}),
            "meta": history.get("meta", {}),
            "node_outputs": self._node_outputs(prompt),
            "executed_nodes": [d.get("node") for e, d in self.events
                               if e == "executing" and isinstance(d, dict) and d.get("node") is not None],
            "events": list(self.events),
            **({"history_route_error": history["history_route_error"]}
               if "history_route_error" in history else {}),
        }

    def _node_outputs(self, prompt: dict) -> dict:
        """Summaries of the values each node returned, read from ComfyUI's output cache."""
        if not self.executors:
            return {}
        caches = self.executors[-1].caches
        out = {}
        for node_id in prompt:
            try:
                entry = self.cache_get(caches.outputs, node_id)
            except Exception as exc:
                out[node_id] = {"error": repr(exc)}
                continue
            if entry is not None:
                out[node_id] = describe(getattr(entry, "outputs", entry))
        return out


    def cache_get(self, cache, node_id: str):
        """``cache.get(node_id)``; awaited where the host's cache is async (0.28)."""
        entry = cache.get(node_id)
        if inspect.isawaitable(entry):
            entry = self.loop.run_until_complete(entry)
        return entry

    def extra_packs_report(self, names) -> list:
        out = []
        for name in names:
            ok = self.load_results.get(self.pack_path(name))
            out.append({"name": name, "path": self.packs[name],
                        "import_failed": None if ok is None else not ok,
                        "import_log": self.import_logs.get(self.pack_path(name), [])})
        return out

    def run_script(self, item: dict, deadline: float) -> dict:
        """Import ``item["path"]`` and call its ``run(ScriptContext)``; report result or traceback."""
        import importlib.util

        entry = {"path": item["path"], "ok": False, "result": None, "error": None}
        log_start = len(self.log.records)
        t0 = time.perf_counter()
        try:
            name = f"_comfy_harness_script_{self.scripts_run}"
            self.scripts_run += 1
            module_spec = importlib.util.spec_from_file_location(name, item["path"])
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            entry["result"] = module.run(ScriptContext(self, item.get("args") or {}, deadline))
            entry["ok"] = True
        except BaseException:
            entry["error"] = traceback.format_exc()
        entry["duration_s"] = round(time.perf_counter() - t0, 3)
        entry["log"] = self.log.records[log_start:]
        return entry


class ScriptContext:
    """What a script's ``run(ctx)`` gets: the booted ComfyUI's folders and a few tools.

    ``args``: the JSON-able dict given with the script. ``work_dir`` (ComfyUI's base directory),
    ``models_dir`` (``folder_paths.models_dir``: the job's models while it runs), ``comfy_root``: ``Path``.
    """

    def __init__(self, comfy: "_Comfy", args: dict, deadline: float):
        import folder_paths

        self._comfy, self._deadline = comfy, deadline
        self.args = args
        self.work_dir = comfy.work
        self.models_dir = Path(folder_paths.models_dir)
        self.comfy_root = Path(comfy.spec["comfy_root"])

    def run_prompt(self, prompt: dict) -> dict:
        """Queue ``prompt`` (API format or ``/prompt`` body) through ``POST /prompt`` and the prompt
        worker, wait for it; return its entry, shaped as the report's ``prompts`` items."""
        return self._comfy.run_prompt(-1, prompt, self._deadline)

    def node_outputs(self, node_id: str):
        """The raw values (tensors, models, ...) node ``node_id`` returned in the last prompt run, as
        ComfyUI's output cache holds them: a list per output slot; None if it has none (also when no
        prompt has executed yet)."""
        if not self._comfy.executors:
            return None
        try:
            entry = self._comfy.cache_get(self._comfy.executors[-1].caches.outputs, str(node_id))
        except (AssertionError, AttributeError):  # the cache is set up only once a prompt executes
            return None
        return None if entry is None else getattr(entry, "outputs", entry)

    @contextlib.contextmanager
    def capture_log(self, level: int = logging.DEBUG):
        """Collect log lines (``"LEVEL: message"``) at ``level`` and above while the block runs,
        e.g. ComfyUI's debug-level ``left over keys`` / ``clip unexpected`` when loading a checkpoint."""
        collector, root = _LogCollector(), logging.getLogger()
        collector.setLevel(level)
        old_level = root.level
        root.addHandler(collector)
        root.setLevel(min(old_level, level))  # NOTSET (0) already lets everything through
        try:
            yield collector.records
        finally:
            root.removeHandler(collector)
            root.setLevel(old_level)


def _is_request_body(item: dict) -> bool:
    """A ``/prompt`` request body rather than a bare API-format prompt."""
    prompt = item.get("prompt")
    return isinstance(prompt, dict) and "class_type" not in prompt and all(
        isinstance(v, dict) and "class_type" in v for v in prompt.values())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, default=_jsonable, indent=1)
    os.replace(tmp, path)


def start(spec: dict, boot: dict) -> "_Comfy":
    session = _Comfy(spec, boot)
    session.start()
    import comfyui_version

    boot["comfyui_version"] = comfyui_version.__version__
    packs = {session.pack_path(name) for name in session.packs}
    boot["builtin_import_failed"] = sorted(p for p, ok in session.load_results.items() if not ok and p not in packs)
    return session


def run_job(session: "_Comfy", job: dict, entry: dict) -> None:
    """Run one job's prompts and scripts into ``entry`` (the job's report)."""
    import comfy.model_management as mm

    t0 = time.perf_counter()
    session.switch_to(job)
    entry["folders"] = session.folders()
    entry["pack"] = session.pack_report(job["pack_name"])
    entry["extra_packs"] = session.extra_packs_report(job.get("extra_packs") or ())
    deadline = time.monotonic() + float(job.get("timeout") or 600)
    for index, item in enumerate(job["prompts"]):
        entry["prompts"].append(session.run_prompt(index, item, deadline))
    for item in job.get("scripts") or ():
        entry["scripts"].append(session.run_script(item, deadline))
    mm.unload_all_models()
    entry["models_after_unload_all"] = session.loaded_models()
    entry["timings"]["job_s"] = round(time.perf_counter() - t0, 3)


def main(argv: list[str]) -> int:
    spec_path, out_dir = argv[1], Path(argv[2])
    with open(spec_path) as f:
        spec = json.load(f)
    # Import ComfyUI's modules, not this directory's: cwd/sys.path[0] is the ComfyUI root.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, spec["comfy_root"])
    os.chdir(spec["comfy_root"])

    boot = {"fatal": None, "comfy_root": spec["comfy_root"], "timings": {}}
    try:
        session = start(spec, boot)
    except BaseException:  # report whatever happened; the parent raises on "fatal"
        boot["fatal"] = traceback.format_exc()
        print(boot["fatal"], file=sys.__stderr__)
        session = None
    _write_json(out_dir / "boot.json", boot)
    status = 0 if session is not None else 1
    for i, job in enumerate(spec["jobs"] if session is not None else ()):
        (out_dir / f"job-{i}.started").touch()
        entry = {"fatal": None, "timings": {}, "prompts": [], "scripts": []}
        try:
            run_job(session, job, entry)
        except BaseException:  # a harness failure: this job's report says so; the parent boots again for the rest
            entry["fatal"] = traceback.format_exc()
            print(entry["fatal"], file=sys.__stderr__)
            status = 1
        _write_json(out_dir / f"job-{i}.json", entry)
        if entry["fatal"]:
            break
    sys.__stdout__.flush()
    sys.__stderr__.flush()
    # The prompt worker is a daemon thread blocked on its queue; skip interpreter teardown.
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv)
