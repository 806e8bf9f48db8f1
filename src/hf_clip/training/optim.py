"""AdamW, weight-decay grouping, cosine schedule and temperature clamp from CLIP's recipe (section 2.5).

The paper applies decoupled weight decay "to all weights that are not gains or biases"; like common CLIP
training code we also exempt embedding tables/vectors (token, position, class embeddings) and the learned
temperature, because shrinking them toward zero has no regularising meaning. Convolution and linear
weights (including the ViT patch embedding, which is a convolution) and projection matrices are decayed.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

# Parameter-name fragments that are never decayed, whatever their shape.
NO_DECAY_NAME_PATTERNS = ("bias", "embedding", "logit_scale", "logit_bias")
_DECAYED_OWNERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
_NORM_OWNERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)

# AdamW hyper-parameters per image tower, from the paper's training details.
ADAMW_DEFAULTS = {
    "vit": {"betas": (0.9, 0.98), "eps": 1e-6},
    "resnet": {"betas": (0.9, 0.999), "eps": 1e-8},
}


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / accelerate / torch.compile wrappers."""
    while True:
        for attribute in ("module", "_orig_mod"):
            inner = getattr(model, attribute, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def _is_decayed(owner: nn.Module, local_name: str, full_name: str, param: nn.Parameter) -> bool:
    if isinstance(owner, _NORM_OWNERS) or isinstance(owner, nn.Embedding):
        return False
    if param.ndim < 2 or local_name.startswith("bias") or local_name.endswith("bias"):
        return False
    if isinstance(owner, _DECAYED_OWNERS):
        return True  # a weight matrix, even when named e.g. "patch_embedding.weight"
    return not any(pattern in full_name for pattern in NO_DECAY_NAME_PATTERNS)


def weight_decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters `(decayed, not decayed)`, in `named_parameters` order."""
    decayed, exempt = [], []
    for module_name, module in _unwrap(model).named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full_name = f"{module_name}.{local_name}" if module_name else local_name
            (decayed if _is_decayed(module, local_name, full_name, param) else exempt).append(full_name)
    return decayed, exempt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer parameter groups: decayed weights, and everything else with `weight_decay=0`."""
    decayed, exempt = weight_decay_split(model)
    params = dict(_unwrap(model).named_parameters())
    groups = [
        {"params": [params[n] for n in decayed], "weight_decay": weight_decay},
        {"params": [params[n] for n in exempt], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.2,
    tower: Literal["vit", "resnet"] = "vit",
    **adamw_kwargs,
) -> torch.optim.AdamW:
    """AdamW with the paper's betas/eps for the image tower type; extra kwargs override them."""
    if tower not in ADAMW_DEFAULTS:
        raise ValueError(f"tower must be one of {sorted(ADAMW_DEFAULTS)}, got {tower!r}.")
    kwargs = {**ADAMW_DEFAULTS[tower], **adamw_kwargs}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, **kwargs)


def cosine_schedule_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up to the base rate over `warmup_steps`, then cosine decay to `min_lr_ratio * base`.

    Call `scheduler.step()` once per optimizer step; after `total_steps` the rate stays at the minimum.
    """
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}."
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, lr_factor)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """Clip the learned temperature so logits are never scaled by more than `max_scale` (paper, 2.5).

    `model.logit_scale` holds the log of the multiplier, so it is clamped at `log(max_scale)`. Call after
    every optimizer step.
    """
    logit_scale = getattr(_unwrap(model), "logit_scale", None)
    if not isinstance(logit_scale, torch.Tensor):
        raise AttributeError(
            f"{type(_unwrap(model)).__name__} has no `logit_scale` parameter to clamp; pass the CLIP model."
        )
    logit_scale.clamp_(max=math.log(max_scale))


class ClampLogitScaleCallback(TrainerCallback):
    """`clamp_logit_scale` after every optimizer step of transformers' Trainer, which knows nothing of CLIP's
    temperature: without it a fine-tuning run can push the logit multiplier past the paper's cap of 100.
    With the paper's decay groups as well: `Trainer(..., optimizers=(create_optimizer(model, ...), None),
    callbacks=[ClampLogitScaleCallback()])`. Not for the Trainer with DeepSpeed, whose fp32 master copy it
    would miss (and whose engine cannot broadcast the 0-d temperature); `examples/pretrain.py` handles both."""

    def __init__(self, max_scale: float = 100.0) -> None:
        self.max_scale = max_scale

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ):
        if model is not None and not isinstance(getattr(_unwrap(model), "logit_scale", None), torch.Tensor):
            raise AttributeError(
                f"ClampLogitScaleCallback: {type(_unwrap(model)).__name__} has no temperature (logit_scale) to "
                "clamp; use it with the CLIP model (HfClipModel), or leave it out."
            )

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is not None:
            clamp_logit_scale(model, self.max_scale)
