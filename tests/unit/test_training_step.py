"""One head step's gradient, not only its sign.

tests/jobs/test_train.py checks one step against the authors' code (tests/fixtures/train_step): the
loss bit for bit and the weights after Adam's first step -- which move every weight by about lr x
sign(gradient), so they cannot show a gradient of the wrong size. The fixture holds no gradients, so
here the gradient of the training objective (``trainer.group_objective`` over ``HeadStep``, as
``Trainer.run`` computes it) is compared with central differences of the same objective in float64,
along a random direction per parameter tensor: a detached path, a gradient scaled apart from the
loss or a term missing from the backward pass shows, while the loss value itself is the authors'
(checked here on the fixture's inputs).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iconmatting_core.config import IconMattingConfig
from iconmatting_core.context import region_tokens
from iconmatting_core.preprocess import Placement
from iconmatting_core.training import losses as L
from iconmatting_core.training.trainer import HeadStep, group_objective
from tiny_models import tiny_head

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "train_step"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _objective(head, x, dtype):
    full = Placement(128, 128, 128, 128)
    tokens = [region_tokens(x["ref_feature"][i].to(dtype), (x["guidance"][i, 0] > 0.5).to(dtype), full, 128, "mask")
              for i in range(2)]
    pred = HeadStep(head, 2)(tokens, x["ft_cor"].to(dtype), x["ft_4"].to(dtype), x["ft_8"].to(dtype),
                             {4: x["attn_4"].to(dtype), 8: x["attn_8"].to(dtype)}, x["images"].to(dtype))
    unknown = (x["trimap"] == 0.5).to(dtype)
    return sum(group_objective(L.recipe_losses, unknown, pred, x["alpha"].to(dtype), 2).values())


def test_one_step_gradient_is_the_derivative_of_the_authors_loss():
    x = load_file(str(HERE / "inputs.safetensors"))
    expected = json.loads((HERE / "expected.json").read_text())
    config = IconMattingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in expected["config"].items()})
    head = tiny_head(config, seed=3).train()
    start = copy.deepcopy(head).double()  # before any forward: BatchNorm's running statistics untouched
    loss = _objective(head, x, torch.float32)
    assert float(loss.detach()) == pytest.approx(expected["loss"], rel=1e-6)  # the authors' value
    loss.backward()
    groups = {}  # the head's parts: similarity.token_norm, fusion.guided_convs, detail.alpha_head, ...
    for name, p in head.named_parameters():
        groups.setdefault(".".join(name.split(".")[:2]), []).append(name)
    assert len(groups) == 8
    gen = torch.Generator().manual_seed(0)
    params, grads = dict(start.named_parameters()), {n: p.grad.double() for n, p in head.named_parameters()}
    sloped = 0
    for part, names in groups.items():
        directions = {n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) for n in names}
        analytic = sum(float((grads[n] * d).sum()) for n, d in directions.items())

        def moved(by: float) -> float:
            with torch.no_grad():
                for n, d in directions.items():
                    params[n].add_(by * d)
                value = float(_objective(start, x, torch.float64))
                for n, d in directions.items():
                    params[n].sub_(by * d)
            return value

        eps = 1e-6  # float64 steps; the similarity computes in float32, whose rounding bounds the agreement
        numeric = (moved(eps) - moved(-eps)) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-4), part
        sloped += abs(numeric) > 5e-4
    assert sloped >= 7  # a real slope in (nearly) every part: not a test of zeros
