"""The one place of the project's version: read by pyproject.toml (setuptools and the Comfy Registry's
``[tool.comfy.version]``) and exported as ``iconmatting_core.__version__``."""
__version__ = "0.2.0"
