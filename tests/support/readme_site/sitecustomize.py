"""Start-up hook of the tests' own Python subprocesses that run in the documented command-line environment
(tests/support/documented_env.py puts this folder first on their PYTHONPATH: the README's commands, the command
line started as a process, torchrun's ranks, a local Ray's workers).

The README's commands run on tiny random-weight models. A model is its weights *and* its architecture,
and where a command has no file to read the architecture from -- the authors' ``icm.ckpt`` holds no
config, and ``train`` without ``--init`` builds a new head -- the architecture is the released model's,
``IconMattingConfig``'s defaults. So, to stand a tiny model in for the released one, the defaults are the
tiny model's here: ``ICONMATTING_TINY_RELEASE`` holds them (JSON of config fields), set by the test. The
library's own code runs unchanged; only the class's default values differ, set the moment
``iconmatting_core.config`` is first imported (before any other module can build a config from them).

``ICONMATTING_HIDDEN_PACKAGES`` (comma-separated) names packages installed in the test venv that the
README's command-line environment (``requirements-cli.txt`` and the extras) does not contain; they are
made unimportable (``sys.modules[name] = None``: ``import`` fails, ``importlib.util.find_spec`` says
absent), so the commands run as in the documented environment. The test asserts that no documented
requirement needs them. (diffusers imports transformers and scipy whenever they are present: about 2.7 s
of CPU per command here.)
"""
import importlib.abc
import json
import os
import sys

_MODULE = "iconmatting_core.config"


def _tiny_defaults(cls, fields: dict) -> None:
    names = list(cls.__dataclass_fields__)
    unknown = set(fields) - set(names)
    if unknown:
        raise RuntimeError(f"ICONMATTING_TINY_RELEASE: IconMattingConfig has no field(s) {sorted(unknown)}")
    for name, value in fields.items():
        value = tuple(value) if isinstance(value, list) else value
        cls.__dataclass_fields__[name].default = value
        setattr(cls, name, value)
    # a dataclass' __init__ keeps its defaults in __defaults__, in field order (every field has one)
    cls.__init__.__defaults__ = tuple(getattr(cls, n) for n in names)


class _PatchConfigOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, fields: dict):
        self.fields = fields

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # once: find the real module with the other finders
        spec = next(s for s in (f.find_spec(name, path, target) for f in sys.meta_path
                                if hasattr(f, "find_spec")) if s is not None)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _tiny_defaults(module.IconMattingConfig, self.fields)

        spec.loader.exec_module = exec_module
        return spec


for _name in filter(None, os.environ.get("ICONMATTING_HIDDEN_PACKAGES", "").split(",")):
    sys.modules[_name] = None
if os.environ.get("ICONMATTING_TINY_RELEASE"):
    sys.meta_path.insert(0, _PatchConfigOnImport(json.loads(os.environ["ICONMATTING_TINY_RELEASE"])))
