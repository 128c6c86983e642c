"""Subprocess side of ``comfy_harness.run_comfy``: boot a real ComfyUI headless, run prompts.

Usage: ``python _comfy_runner.py SPEC.json REPORT.json`` with the ComfyUI root as cwd and the
host's stand-ins (``torchvision``, ``torchaudio``) on ``PYTHONPATH`` (``comfy_harness`` does both). SPEC holds ``comfy_root``,
``pack_dir``, ``models_dir`` (or null), ``work_dir``, ``prompts`` and ``timeout``, and optionally
``extra_packs`` ([{``path``, ``name``}], symlinked into ``custom_nodes/`` beside the pack),
``scripts`` ([{``path``, ``args``}]) and ``comfy_args`` (extra ComfyUI command-line flags).

ComfyUI is started the way its ``main.py`` starts it: ``sys.argv`` gets CPU flags, then ``main`` is
imported (argument parsing, path setup, prestartup scripts) and ``main.start_comfyui()`` builds
the ``PromptServer``, loads the built-in extra nodes and the custom nodes, and starts the real
prompt worker thread. The web server itself is never started. ``work_dir`` is passed as
``--base-directory``, so ``work_dir/custom_nodes`` (holding only a symlink to the pack),
``work_dir/models`` (a symlink to ``models_dir``), ``output``, ``temp``, ``input`` and ``user`` are
ComfyUI's folders.

The report (JSON; anything not serialisable is ``repr``'d) has these keys:

* ``comfyui_version``, ``comfy_root``, ``fatal`` (traceback of a harness failure, else null),
  ``timings`` (``startup_s``), ``startup_log`` (warning+ log lines of startup, deduplicated),
  ``builtin_import_failed`` (module paths of built-in extras ComfyUI could not import),
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
  - ``new_files``: files that appeared under ``output/`` or ``temp/`` (``path`` relative to the
    base directory, ``size``, and for images ``image_size`` [w, h] and ``image_mode``);
  - ``models``: ``comfy.model_management.current_loaded_models`` after the prompt: ``count``,
    ``models`` (``patcher_class``, ``model_class``, ``device``, ``currently_used``),
    ``model_classes``;
  - ``log``: ComfyUI's log lines while the prompt ran (e.g. ``!!! Exception during processing``).
* ``extra_packs``: per extra pack, ``name``, ``path``, ``import_failed``, ``import_log``.
* ``scripts``: per script, in order: ``path``, ``ok``, ``result`` (what ``run(ctx)`` returned),
  ``error`` (its traceback, else null), ``duration_s`` and ``log`` (log lines while it ran).
* ``models_after_unload_all``: the same as ``models``, after ``unload_all_models()``.

Scripts run in the main thread of the ComfyUI process after the prompts (the prompt worker is
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


def _prepare_work_dir(work: Path, pack_dir: Path, pack_name: str, models_dir: str | None,
                      extra_packs: list | None = None) -> None:
    """Lay out ``work`` as ComfyUI's ``--base-directory``."""
    for sub in ("custom_nodes", "frontend", "output", "input", "temp", "user"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    for name, target in [(pack_name, pack_dir)] + [(e["name"], Path(e["path"])) for e in extra_packs or ()]:
        link = work / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=target.is_dir())
    models = work / "models"
    if models.is_symlink():
        models.unlink()
    if models_dir is not None:
        if models.exists():
            raise RuntimeError(f"{models} exists; cannot point it at {models_dir}")
        models.symlink_to(models_dir, target_is_directory=True)
    else:
        models.mkdir(exist_ok=True)


def _list_files(*dirs: Path) -> dict:
    out = {}
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                out[str(p)] = p.stat().st_size
    return out


def _file_info(path: str, size: int, work: Path) -> dict:
    info = {"path": os.path.relpath(path, work), "size": size}
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
        self.pack_dir = Path(spec["pack_dir"])
        self.pack_name = spec.get("pack_name") or self.pack_dir.name
        self.pack_path = str(self.work / "custom_nodes" / self.pack_name)
        self.load_results: dict[str, bool] = {}
        self.executors: list = []
        self.events: list = []
        self.log = _LogCollector()
        self.pack_log: list[str] | None = None
        self.import_logs: dict[str, list[str]] = {}

    # --- startup -------------------------------------------------------------------------
    def start(self) -> None:
        work = self.work
        _prepare_work_dir(work, self.pack_dir, self.pack_name, self.spec.get("models_dir"),
                          self.spec.get("extra_packs"))
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
            is_pack = os.path.abspath(module_path) == os.path.abspath(harness.pack_path)
            start = len(harness.log.records)
            ok = await original_load(module_path, *args, **kwargs)
            harness.load_results[module_path] = ok
            harness.import_logs[os.path.abspath(module_path)] = harness.log.records[start:]
            if is_pack:
                harness.pack_log = harness.log.records[start:]
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
    def pack_report(self) -> dict:
        import nodes

        module = f"custom_nodes.{nodes.get_module_name(self.pack_path)}"
        names = sorted(name for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
                       if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module)
        ok = self.load_results.get(self.pack_path)
        info, errors = {}, {}
        for name in names:
            try:
                _, body = self.call_route("GET", "/object_info/{node_class}", {"node_class": name})
                info[name] = body.get(name)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
        return {
            "name": self.pack_name,
            "path": str(self.pack_dir),
            "import_failed": None if ok is None else not ok,
            "import_log": self.pack_log or [],
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
        dirs = (Path(self._folder("output")), Path(self._folder("temp")))
        before = _list_files(*dirs)
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
        after = _list_files(*dirs)
        entry["new_files"] = [_file_info(p, size, self.work) for p, size in sorted(after.items())
                              if before.get(p) != size]
        entry["models"] = self.loaded_models()
        return entry

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

    def extra_packs_report(self) -> list:
        out = []
        for extra in self.spec.get("extra_packs") or ():
            path = os.path.abspath(self.work / "custom_nodes" / extra["name"])
            ok = self.load_results.get(str(self.work / "custom_nodes" / extra["name"]))
            out.append({"name": extra["name"], "path": extra["path"],
                        "import_failed": None if ok is None else not ok,
                        "import_log": self.import_logs.get(path, [])})
        return out

    def run_script(self, item: dict, deadline: float) -> dict:
        """Import ``item["path"]`` and call its ``run(ScriptContext)``; report result or traceback."""
        import importlib.util

        entry = {"path": item["path"], "ok": False, "result": None, "error": None}
        log_start = len(self.log.records)
        t0 = time.perf_counter()
        try:
            name = f"_comfy_harness_script_{len(self.report['scripts'])}"
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
    ``models_dir`` (``folder_paths.models_dir``), ``comfy_root``: ``Path``. ``report``: the report
    so far (read only).
    """

    def __init__(self, comfy: "_Comfy", args: dict, deadline: float):
        import folder_paths

        self._comfy, self._deadline = comfy, deadline
        self.args = args
        self.work_dir = comfy.work
        self.models_dir = Path(folder_paths.models_dir)
        self.comfy_root = Path(comfy.spec["comfy_root"])
        self.report = comfy.report

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


def run(spec: dict, report: dict) -> None:
    session = _Comfy(spec, report)
    session.start()
    import comfy.model_management as mm
    import comfyui_version

    report["comfyui_version"] = comfyui_version.__version__
    report["folders"] = session.folders()
    extra_paths = {str(session.work / "custom_nodes" / e["name"]) for e in spec.get("extra_packs") or ()}
    report["builtin_import_failed"] = sorted(p for p, ok in session.load_results.items()
                                             if not ok and p != session.pack_path and p not in extra_paths)
    report["pack"] = session.pack_report()
    report["extra_packs"] = session.extra_packs_report()

    deadline = time.monotonic() + float(spec.get("timeout") or 600)
    for index, item in enumerate(spec["prompts"]):
        report["prompts"].append(session.run_prompt(index, item, deadline))
    report["scripts"] = []
    for item in spec.get("scripts") or ():
        report["scripts"].append(session.run_script(item, deadline))

    mm.unload_all_models()
    report["models_after_unload_all"] = session.loaded_models()


def main(argv: list[str]) -> int:
    spec_path, report_path = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    # Import ComfyUI's modules, not this directory's: cwd/sys.path[0] is the ComfyUI root.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, spec["comfy_root"])
    os.chdir(spec["comfy_root"])

    report = {"fatal": None, "comfy_root": spec["comfy_root"], "timings": {}, "prompts": []}
    try:
        run(spec, report)
    except BaseException:  # report whatever happened; the parent raises on "fatal"
        report["fatal"] = traceback.format_exc()
        print(report["fatal"], file=sys.__stderr__)
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, default=_jsonable, indent=1)
    os.replace(tmp, report_path)
    sys.__stdout__.flush()
    sys.__stderr__.flush()
    # The prompt worker is a daemon thread blocked on its queue; skip interpreter teardown.
    os._exit(0 if report["fatal"] is None else 1)


if __name__ == "__main__":
    main(sys.argv)
