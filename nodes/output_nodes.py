"""Nodes 5 and 6: the results -- alpha mattes and RGBA cut-outs, and cut-outs over new backgrounds."""
from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..iconmatting_core.matching import MatchResult
from ..iconmatting_core.postprocess import composite_over, pair_backgrounds
from .common import precision_hint, TASK_WORDS, CATEGORY, LOAD_NODE, MatchType, ModelType, advanced, progress, schema, split_images

#: display names carry the words users search for (frontends without search_aliases search only names)
DECODE_NODE = "IconMatting 5 · Remove Background"
COMPOSITE_NODE = "IconMatting 6 · Composite Cutouts"


class IconMattingDecodeAlpha(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingDecodeAlpha",
            display_name=DECODE_NODE,
            category=CATEGORY,
            search_aliases=TASK_WORDS,
            description="Removes the background: predicts each matched target's alpha matte at its own resolution, and "
            "its RGBA cut-out.",
            inputs=[
                ModelType.Input("iconmatting_model", tooltip=f"From {LOAD_NODE}."),
                MatchType.Input("match", tooltip="From IconMatting 4 · Match Targets."),
                io.Boolean.Input("estimate_foreground", default=True,
                                 tooltip="Clean the colours of semi-transparent edges, so the cut-out shows no halo of the old "
                                 "background when composited."),
                advanced(io.Int.Input("chunk_size", default=4, min=1, max=64,
                                      tooltip="Targets decoded at once. Larger is faster on a big GPU and needs more memory.")),
            ],
            outputs=[
                io.Mask.Output("alpha", is_output_list=True, tooltip="One alpha matte per target, at its own size."),
                io.Image.Output("rgba", is_output_list=True, tooltip="One RGBA cut-out per target (straight alpha)."),
            ],
        )

    @classmethod
    def execute(cls, iconmatting_model, match, estimate_foreground, chunk_size=4):
        if not isinstance(match, MatchResult):
            raise TypeError("match must come from IconMatting 4 · Match Targets.")
        pipe = iconmatting_model.pipeline(features=False)
        try:
            alphas = pipe.decode(match, chunk_size=chunk_size, progress=progress(len(match)),
                                 output_device=mm.intermediate_device())
        except FloatingPointError as exc:
            raise FloatingPointError(precision_hint(exc)) from None
        cutouts = []
        for src, alpha in zip(match.sources, alphas):
            mm.throw_exception_if_processing_interrupted()
            cutouts.append(pipe.cutout(src.to(alpha.device), alpha, bool(estimate_foreground))[None])
        return io.NodeOutput([a[None] for a in alphas], cutouts)


class IconMattingComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="IconMattingComposite",
            display_name=COMPOSITE_NODE,
            category=CATEGORY,
            search_aliases=["composite", "replace background", "change background", "new background", "background swap"],
            description="Places RGBA cut-outs over new backgrounds (each resized to cover its cut-out). Cut-outs and "
            "backgrounds may be batches or lists (e.g. from Remove Background and Load Image Folder): one background for all "
            "cut-outs, one cut-out over every background (a product on many backgrounds), or the i-th cut-out over the i-th "
            "background.",
            is_input_list=True,
            inputs=[
                io.Image.Input("rgba", tooltip=f"RGBA cut-outs from {DECODE_NODE}."),
                io.Image.Input("background", tooltip="New background(s): one for all cut-outs, any number for one cut-out, "
                               "or one per cut-out (in order)."),
            ],
            outputs=[io.Image.Output("image", is_output_list=True,
                                     tooltip="One composite per cut-out (or per background, for one cut-out), at the cut-out's size.")],
        )

    @classmethod
    def execute(cls, rgba, background):
        cutouts, backgrounds = split_images(rgba), split_images(background)
        if any(c.shape[-1] != 4 for c in cutouts):
            raise ValueError(f"rgba must have 4 channels. Connect the rgba output of {DECODE_NODE}.")
        pairs = pair_backgrounds(len(cutouts), len(backgrounds))
        return io.NodeOutput([composite_over(cutouts[i], backgrounds[j])[None] for i, j in pairs])
