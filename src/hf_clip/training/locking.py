"""Locked-tower training: LiT ("Locked-image Tuning", Zhai et al. 2022, arXiv:2111.07991).

Why: a tower taken from a strong pretrained model keeps its representation when the other tower learns to
read it, instead of both being pulled toward whatever the (often smaller or noisier) caption data teaches.
LiT found a locked pretrained image tower with a text tower trained against it better at zero-shot transfer
than training both, and a locked tower costs no backward pass, optimizer state or activation memory.

The parameter groups are open_clip's (`lock_image_tower` / `lock_text_tower` of open_clip 3.3), so
open_clip's `--lock-image-unlocked-groups N` and `--lock-text-unlocked-layers N` keep the last N groups
trainable here too:

- ViT image tower: [patch embedding, class embedding, position embedding, pre-LayerNorm], each block but the
  last, [last block, post-LayerNorm], [projection];
- ResNet image tower: [stem], each stage, [attention pool] (it ends in the embedding width: no projection);
- text tower: [token and position embeddings], each block but the last, [last block, final LayerNorm],
  [projection].

A fully locked tower also runs its forward under `torch.no_grad` (hooks on the tower and its projection):
it keeps no activations for backward and nothing flows back into it, even where something upstream asks
for gradients (transformers' gradient checkpointing makes the token embeddings' output require grad, which
otherwise builds a graph through every locked layer of the text tower). The learned temperature (and
SigLIP's bias) belong to neither tower and stay trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .optim import _unwrap

Tower = Literal["image", "text"]
Group = list[nn.Module | nn.Parameter]


@dataclass(frozen=True)
class TowerLock:
    """What `lock_image_tower` or `lock_text_tower` did (for logs and the run's training record)."""

    tower: Tower
    groups: int  # parameter groups of the tower
    unlocked_groups: int  # trainable groups, counted from the end
    fully_locked: bool  # no parameter of the tower or its projection trains: it runs without autograd
    # Image towers: the locked part's BatchNorm layers stay in eval mode.
    freeze_bn_stats: bool = False
    # Text towers: False leaves the locked part's LayerNorm gains and biases trainable.
    freeze_layer_norm: bool = True

    def describe(self) -> str:
        """One line, e.g. 'image tower locked (all 14 parameter groups)'."""
        if self.unlocked_groups:
            locked = self.groups - self.unlocked_groups
            what = (
                f"the first {locked} of {self.groups} parameter groups; the last {self.unlocked_groups} train"
            )
        else:
            what = f"all {self.groups} parameter groups"
        extras = []
        if self.freeze_bn_stats:
            extras.append("BatchNorm statistics frozen")
        if self.tower == "text" and not self.freeze_layer_norm:
            extras.append("its LayerNorm gains and biases train")
        return f"{self.tower} tower locked ({'; '.join([what, *extras])})"


def image_tower_groups(model: nn.Module) -> list[Group]:
    """The image tower's parameter groups, from the input to the embedding (see the module docstring)."""
    model = _unwrap(model)
    tower, projection = model.vision_model, model.visual_projection
    if hasattr(tower, "attnpool"):  # HfClipResNet
        stem: Group = [getattr(tower, name) for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")]
        stages: list[Group] = []
        while hasattr(tower, f"layer{len(stages) + 1}"):
            stages.append([getattr(tower, f"layer{len(stages) + 1}")])
        groups = [stem, *stages, [tower.attnpool, projection]]
    else:  # HfClipVisionTransformer
        layers = list(tower.encoder.layers)
        groups = [
            [tower.embeddings, tower.pre_layernorm],
            *([layer] for layer in layers[:-1]),
            [layers[-1], tower.post_layernorm],
            [projection],
        ]
    _check_covers(groups, [tower, projection], "image")
    return groups


def text_tower_groups(model: nn.Module) -> list[Group]:
    """The text tower's parameter groups, from the input to the embedding (see the module docstring)."""
    model = _unwrap(model)
    tower, projection = model.text_model, model.text_projection
    layers = list(tower.encoder.layers)
    groups = [
        [tower.embeddings],
        *([layer] for layer in layers[:-1]),
        [layers[-1], tower.final_layer_norm],
        [projection],
    ]
    _check_covers(groups, [tower, projection], "text")
    return groups


def _parameters(item: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [item] if isinstance(item, nn.Parameter) else list(item.parameters())


def _check_covers(groups: list[Group], modules: list[nn.Module], tower: str) -> None:
    """Every parameter of the tower in exactly one group: a layer added to the model later must not stay
    trainable (or locked) unnoticed."""
    grouped = [id(p) for group in groups for item in group for p in _parameters(item)]
    owned = {id(p) for m in modules for p in m.parameters()}
    if len(grouped) != len(set(grouped)) or set(grouped) != owned:
        raise RuntimeError(f"hf_clip's {tower} tower groups do not cover its parameters exactly once.")


def _check_count(unlocked: int, groups: int, option: str, tower: Tower) -> None:
    if isinstance(unlocked, bool) or not isinstance(unlocked, int) or unlocked < 0:
        raise ValueError(f"{option} must be a whole number >= 0, got {unlocked!r}.")
    if unlocked >= groups:
        raise ValueError(
            f"{option} {unlocked}: this {tower} tower has {groups} parameter groups, so at most {groups - 1} "
            f"can stay unlocked (all {groups} would lock nothing; leave the lock out to train the whole tower)."
        )


def _lock(groups: list[Group], unlocked: int) -> list[Group]:
    """requires_grad off for every group, back on for the last `unlocked`; returns the locked groups."""
    for group in groups:
        for item in group:
            for param in _parameters(item):
                param.requires_grad_(False)
    locked = groups[: len(groups) - unlocked]
    for group in groups[len(groups) - unlocked :]:
        for item in group:
            for param in _parameters(item):
                param.requires_grad_(True)
    return locked


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> TowerLock:
    """Lock `model`'s image tower and projection but their last `unlocked_groups` parameter groups.

    `freeze_bn_stats` (ResNet towers) keeps the locked part's BatchNorm layers in eval mode, through any
    later `model.train()`: they normalise with the pretrained running statistics and never update them, so
    the locked weights and statistics both stay as loaded. Without it they normalise each batch by its own
    statistics and keep updating the running ones, as open_clip does without `--lock-image-freeze-bn-stats`.
    `SyncBatchNorm.convert_sync_batchnorm` afterwards would turn the frozen layers into ones that train again:
    convert only the trainable part. A fully locked tower also passes no gradient back to its input (pixels),
    so saliency maps or adversarial examples need the model loaded afresh, or locked with unlocked groups.
    """
    groups = image_tower_groups(model)
    _check_count(unlocked_groups, len(groups), "unlocked_groups (--lock_image_unlocked_groups)", "image")
    norms = _locked_batch_norms(groups[: len(groups) - unlocked_groups]) if freeze_bn_stats else []
    for module in _tower_modules(model, "image"):  # a lock replaces an earlier one
        for norm in module.modules():
            if type(norm) is _EvalModeBatchNorm2d:
                norm.__class__ = nn.BatchNorm2d
                norm.train(module.training)
    _lock(groups, unlocked_groups)
    for norm in norms:
        norm.__class__ = _EvalModeBatchNorm2d
        norm.eval()
    return _finish(model, "image", len(groups), unlocked_groups, freeze_bn_stats=freeze_bn_stats)


def _locked_batch_norms(locked: list[Group]) -> list[nn.Module]:
    """The BatchNorm layers that `freeze_bn_stats` keeps in eval mode, checked before the lock changes
    anything: a refused lock leaves the model as it was (not half locked, without its no-grad hooks)."""
    modules = [m for group in locked for item in group if isinstance(item, nn.Module) for m in item.modules()]
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(
            "freeze_bn_stats (--lock_image_freeze_bn_stats): this image tower has no BatchNorm layer in its locked part "
            "(a ViT has none); leave the option out."
        )
    for norm in norms:
        if type(norm) not in (nn.BatchNorm2d, _EvalModeBatchNorm2d):
            raise TypeError(
                f"freeze_bn_stats supports nn.BatchNorm2d layers, not {type(norm).__name__}: lock before any "
                "SyncBatchNorm conversion, and convert only the trainable layers (a frozen one has nothing to sync)."
            )
    return norms


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> TowerLock:
    """Lock `model`'s text tower and projection but their last `unlocked_layers` parameter groups.

    `freeze_layer_norm=False` leaves the LayerNorm gains and biases of the locked part trainable, as open_clip
    does for its Hugging Face text towers without `--lock-text-freeze-layer-norm` (the default here is
    open_clip's `lock_text_tower` default, True). The tower then still needs a backward pass through all of
    it, so only `freeze_layer_norm=True` with no unlocked groups runs it without autograd.
    """
    groups = text_tower_groups(model)
    _check_count(unlocked_layers, len(groups), "unlocked_layers (--lock_text_unlocked_layers)", "text")
    locked = _lock(groups, unlocked_layers)
    if not freeze_layer_norm:
        for group in locked:
            for item in group:
                modules = item.modules() if isinstance(item, nn.Module) else ()
                for module in modules:
                    if isinstance(module, nn.LayerNorm):
                        module.requires_grad_(True)
    return _finish(model, "text", len(groups), unlocked_layers, freeze_layer_norm=freeze_layer_norm)


def _finish(model: nn.Module, tower: Tower, groups: int, unlocked: int, **options: bool) -> TowerLock:
    fully = tower_is_locked(model, tower)
    for module in _tower_modules(model, tower):
        _run_without_grad(module, fully)
    return TowerLock(tower, groups, unlocked, fully, **options)


def _tower_modules(model: nn.Module, tower: Tower) -> list[nn.Module]:
    model = _unwrap(model)
    if tower == "image":
        return [model.vision_model, model.visual_projection]
    return [model.text_model, model.text_projection]


def tower_is_locked(model: nn.Module, tower: Tower) -> bool:
    """Whether no parameter of the tower (and its projection) is trainable."""
    return not any(p.requires_grad for m in _tower_modules(model, tower) for p in m.parameters())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(_unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def locked_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a lock keeps as it is, by state-dict name: every frozen parameter and the floating-point
    statistics of BatchNorm layers frozen by `freeze_bn_stats` (detached, not copied)."""
    model = _unwrap(model)
    kept = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, _EvalModeBatchNorm2d):
            for key, buffer in module.named_buffers(prefix=name, recurse=False):
                if buffer.is_floating_point():
                    kept[key] = buffer.detach()
    return kept


class _EvalModeBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode whatever `train()` asks (`freeze_bn_stats`). Same parameters,
    buffers and state dict as the layer it was: only its `train` differs."""

    def train(self, mode: bool = True) -> _EvalModeBatchNorm2d:
        return super().train(False)


def _disable_grad(module: nn.Module, args: tuple) -> None:
    module._lock_grad_modes.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _restore_grad(module: nn.Module, args: tuple, output: object) -> None:
    torch.set_grad_enabled(module._lock_grad_modes.pop())


def _run_without_grad(module: nn.Module, enable: bool) -> None:
    """Run `module`'s forward under torch.no_grad from now on (the grad mode is restored after it, errors
    included), or no longer. Only the lock functions switch it: a parameter of a fully locked tower set
    trainable by hand afterwards gets no gradient; lock the tower again with unlocked groups instead."""
    handles = module.__dict__.pop("_lock_no_grad_hooks", None)
    for handle in handles or ():
        handle.remove()
    if enable:
        module._lock_grad_modes = []
        module._lock_no_grad_hooks = (
            module.register_forward_pre_hook(_disable_grad),
            module.register_forward_hook(_restore_grad, always_call=True),
        )
