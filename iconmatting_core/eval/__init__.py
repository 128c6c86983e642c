"""ICM-57 evaluation: ``python -m iconmatting_core.eval --data DIR --matting-weights PATH --sd PATH``.

Data layout (what the reference repository, tiny-smart/in-context-matting, reads; see its
``icm/data/image_file.py``: ``get_dir_ext`` and ``ContextData``)::

    datasets/
    ├── ICM57.json          # groups: {image_name: {"class", "sub_class", "HalfOrFull", ...}}
    └── ICM57/              # = --data DIR
        ├── image/<name>.jpg
        ├── alpha/<name>.png    # ground-truth alpha, 8-bit gray
        └── trimap/<name>.png   # optional here (only for --region unknown)

* The json maps each image name (file name without extension) to a record such as
  ``{"dataset_name": "ICM57", "class": "animal", "sub_class": null, "HalfOrFull": "half",
  "TransparentOrOpaque": "SO"}``. As in the reference (``ContextData.get_image_class_dict``) an
  image's group is ``f"{class}-{sub_class}-{HalfOrFull}"`` (``str()`` of each, so ``null`` becomes
  ``None``). The json is looked for at ``--json`` if given, else next to the data folder as
  ``<DIR>.json`` (the reference's ``datasets/ICM57.json``), else inside it as ``DIR/ICM57.json``
  or ``DIR/<DIR name>.json``. Groups are never guessed when the json is missing: the reference has
  no such fallback (it fails to open the json), so neither do we.
* Only the images listed in the json are evaluated (like the reference); files are looked up
  with the reference's extensions first (``.jpg`` images, ``.png`` alpha/trimap), then other
  common ones. A listed image without its image or alpha file is an error naming the file.
* Images and mattes are read with Pillow (EXIF orientation applied, as ``cv2.imread`` does);
  alpha is read as gray and divided by 255 (16-bit PNGs by 65535), as ``cv2.imread(path, 0) / 255``.

Two protocols (``--protocol``, several may be given; one table row per protocol, number of
references and region):

``project`` (default; this project's way of running the model, not the paper's). Within a group
sorted by name ``[a0, a1, ..., an]``, ``a0`` is the reference for ``a1..an`` and ``a1`` is the
reference for ``a0``; a group of one image is evaluated with itself as reference. Images go to
the pipeline at their own size (letterboxed), predictions come back at the original size (one
of another size is resized bilinearly, ``align_corners=False``), and the metrics are summed over
the whole image by default.

``reference`` (the authors' released evaluation path, ``eval.py`` with ``config/eval.yaml``:
``InContextDataset`` -> ``CropResize(768)`` -> ``validation_step_end``; comparable with the
paper's ICM-57 table):

* every image and alpha is centre-cropped to a square (``margin = (long - short) // 2`` on the
  long side, :func:`centre_crop_box`) and resized to ``image_size`` (768) squared;
* each target gets its reference(s) drawn at random from its own group, the target itself
  excluded when the group has more than two images (in a group of two the reference may be the
  target itself, as in the reference code); the draw is seeded (``--seed``) per target name, so it
  does not depend on the order or on ``--limit`` (:func:`draw_references`). ``--references K``
  draws K different ones (as many as the group allows), all encoded into one context;
* the guidance is the reference's ground-truth soft alpha after the same crop and resize; the
  model binarises it at 0.5 (``SemiTrainingAttentionBlocks.forward``) and keeps the 16x16 cells
  it covers entirely (min-pooling), which the pipeline does for a mask of the model's size;
* the square prediction is stretched back over the whole original frame (bilinear,
  ``align_corners=False``, to the original HxW, although it came from a crop: this reproduces the
  reference's ``F.interpolate(pred, size=alpha_shape)`` exactly, borders included) and quantised
  like the PNG the reference saves (``(pred * 255).astype(uint8)``, i.e. floor; ``--quantize``
  overrides);
* metrics are computed against the original alpha and trimap, by default over the trimap's
  unknown region (``85 <= t < 170``; < 85 background, >= 170 foreground, as ``ToTensor``).

Not reproduced: the reference resizes with an interpolation drawn at random per image
(``RANDOM_INTERP = True``: nearest, bilinear, bicubic or Lanczos); here images and alphas are
resized bilinearly with antialiasing (deterministic); its unseeded dataloader draws; the random
dropping of json entries that carry an ``instance_area_ratio`` field (ICM-57's do not).

Units in every table: SAD, Grad and Conn / 1000, MSE the plain mean (no scaling), as in the
paper's tables. Metrics are means over all target images.

The core is :func:`evaluate` ``(dataset, predict_fn) -> EvalResults``; the model only enters
through ``predict_fn(reference_image, reference_mask, target_images) -> list of alphas`` (float32
HxWx3 / HxW arrays in [0, 1]; with several references per target, ``reference_image`` and
``reference_mask`` are lists), which :func:`build_predict_fn` builds from
``iconmatting_core.pipeline.load_pipeline``. A predictor may carry an ``image_size`` attribute
(the model's square input, used by the reference protocol; 768 otherwise).

Modules, by role: ``dataset`` (indexing and reading the files), ``protocols`` (who references whom,
the reference protocol's crop and draw), ``scoring`` (running a protocol, the metrics per image),
``report`` (CSV, table), ``cli`` (command line, the pipeline as predictor).
"""
from __future__ import annotations

from .cli import build_predict_fn, main
from .dataset import (
    GROUP_FIELDS, IMAGE_EXTS, MATTE_EXTS, DatasetError, ICM57Dataset, Sample, find_json, load_dataset, read_image,
    read_matte, read_trimap,
)
from .protocols import (
    DEFAULT_QUANTIZE, DEFAULT_REGION, PROTOCOLS, Job, centre_crop_box, crop_resize, draw_references, project_jobs,
    reference_jobs, reference_plan,
)
from .report import METRIC_KEYS, TABLE_KEYS, format_table, write_csv
from .scoring import EvalResults, ImageResult, PredictFn, evaluate, run_protocol

__all__ = [
    "DatasetError",
    "Sample",
    "ICM57Dataset",
    "ImageResult",
    "EvalResults",
    "load_dataset",
    "find_json",
    "reference_plan",
    "centre_crop_box",
    "crop_resize",
    "draw_references",
    "reference_jobs",
    "PROTOCOLS",
    "evaluate",
    "run_protocol",
    "format_table",
    "build_predict_fn",
    "main",
    "GROUP_FIELDS",
    "IMAGE_EXTS",
    "MATTE_EXTS",
    "read_image",
    "read_matte",
    "read_trimap",
    "DEFAULT_QUANTIZE",
    "DEFAULT_REGION",
    "Job",
    "project_jobs",
    "METRIC_KEYS",
    "TABLE_KEYS",
    "write_csv",
    "PredictFn",
]
