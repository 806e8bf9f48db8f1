"""Weight-space ensembles of a zero-shot and a fine-tuned model (WiSE-FT, Wortsman et al., 2022).

Fine-tuning CLIP end to end raises accuracy on the target distribution but gives up much of the zero-shot
model's robustness to distribution shift (the paper's section 3.3: adapting to ImageNet lowers accuracy on
the shifted ImageNets). Averaging the two models' weights keeps most of both, at no inference cost; the
robustness evaluation scores each mixing coefficient.
"""

from __future__ import annotations

import copy
import numbers

import torch
from torch import nn


def wise_ft(zero_shot: nn.Module, fine_tuned: nn.Module, alpha: float | numbers.Real) -> nn.Module:
    """A new model with weights (1 - alpha) * zero_shot + alpha * fine_tuned; the inputs are left unchanged.

    Both must be the same architecture, such as `HfClipForImageClassification.from_zero_shot(...)` and the
    copy of it that was fine-tuned, with the same labels. Floating-point weights and buffers (BatchNorm
    statistics too) are interpolated in float32; integer buffers (BatchNorm's batch counts) are taken from the
    model alpha is nearer to, so alpha = 0 and 1 give the two models exactly.
    """
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (0: zero-shot, 1: fine-tuned), got {alpha!r}.")
    alpha = float(alpha)  # numpy scalars too (np.linspace)
    if type(zero_shot) is not type(fine_tuned):
        raise TypeError(
            f"Cannot interpolate a {type(zero_shot).__name__} with a {type(fine_tuned).__name__}; pass two "
            "models of the same class, the fine-tuned one made from the zero-shot one."
        )
    labels = [getattr(getattr(m, "config", None), "id2label", None) for m in (zero_shot, fine_tuned)]
    if labels[0] != labels[1]:
        raise ValueError(
            "The two models' labels (config.id2label) differ, so their classifier rows do not mean the same "
            "classes; fine-tune the model made by from_zero_shot without changing its labels."
        )
    start, end = zero_shot.state_dict(), fine_tuned.state_dict()
    differences = sorted(set(start) ^ set(end))
    differences += [k for k in sorted(set(start) & set(end)) if start[k].shape != end[k].shape]
    if differences:
        raise ValueError(
            f"The models differ in {len(differences)} weights ({', '.join(differences[:3])}"
            f"{', ...' if len(differences) > 3 else ''}); WiSE-FT needs the same architecture in both."
        )
    merged = {}
    for key, a in start.items():
        b = end[key].to(a.device)
        if a.is_floating_point():
            merged[key] = torch.lerp(a.float(), b.float(), alpha).to(a.dtype)
        else:
            merged[key] = (b if alpha >= 0.5 else a).clone()
    model = copy.deepcopy(zero_shot)
    model.load_state_dict(merged)
    return model
