"""IconMatting (In-Context Matting, CVPR 2024) as a small torch/diffusers library.

Flow: preprocess -> features (frozen SD UNet + VAE) -> context (reference region tokens)
-> matching (inter- and intra-image similarity) -> matting_head (alpha) -> postprocess.
"""
from .checkpoint import CheckpointError, convert_checkpoint, load_head, save_head
from .config import IconMattingConfig
from .context import ReferenceContext
from .matching import MatchResult
from .matting_head import IconMattingHead
from .pipeline import IconMattingModel, IconMattingPipeline, load_model, load_pipeline

__all__ = [
    "CheckpointError",
    "IconMattingConfig",
    "IconMattingHead",
    "IconMattingModel",
    "IconMattingPipeline",
    "MatchResult",
    "ReferenceContext",
    "convert_checkpoint",
    "load_head",
    "load_model",
    "load_pipeline",
    "save_head",
]
from ._version import __version__  # noqa: E402, F401  (the one place of the version)
