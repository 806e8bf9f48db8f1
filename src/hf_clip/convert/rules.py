"""Renaming rules between a foreign checkpoint layout and hf_clip's, applied in either direction.

A layout is described once, as a list of `Rule`s generated from the config; the same list converts into
hf_clip and back out of it, and every tensor of the source must be claimed by a rule (or be a known extra),
so an unfamiliar checkpoint fails loudly instead of loading half its weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["ConversionError", "Rule", "apply_rules", "invert_rules", "check_shapes"]


class ConversionError(ValueError):
    """The checkpoint does not fit the architecture: missing, unexpected or mis-shaped tensors."""


@dataclass(frozen=True)
class Rule:
    """`target` (hf_clip name) is built from `sources` (names in the other layout).

    kind: "copy"; "transpose" (OpenAI stores projections as [in, out], nn.Linear as [out, in]); "concat" (one
    fused tensor from several along dim 0, e.g. separate q/k/v projections into hf_clip's qkv_proj).
    `zero_if_missing`: a BatchNorm batch counter, unused at inference, that some exports omit.
    """

    target: str
    sources: tuple[str, ...]
    kind: str = "copy"
    zero_if_missing: bool = False


def _summary(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def apply_rules(
    state_dict: Mapping[str, torch.Tensor],
    rules: list[Rule],
    ignored: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Build the hf_clip state dict from a foreign one; raise naming every missing or unexpected tensor."""
    claimed = {source for rule in rules for source in rule.sources}
    unexpected = set(state_dict) - claimed - set(ignored)
    missing = [
        source
        for rule in rules
        if not rule.zero_if_missing
        for source in rule.sources
        if source not in state_dict
    ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {_summary(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_summary(unexpected)}")
        raise ConversionError(
            f"The {what} does not match the architecture it is read as ({'; '.join(problems)}). It may be "
            "a different model family or a partial file, or need another --config."
        )
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.zero_if_missing and rule.sources[0] not in state_dict:
            out[rule.target] = torch.zeros((), dtype=torch.long)
            continue
        tensors = [state_dict[source] for source in rule.sources]
        if rule.kind == "copy":
            out[rule.target] = tensors[0]
        elif rule.kind == "transpose":
            out[rule.target] = tensors[0].t().contiguous()
        elif rule.kind == "concat":
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise ConversionError(
                    f"Cannot fuse {list(rule.sources)}: their shapes differ ({sorted(shapes)})."
                )
            out[rule.target] = torch.cat(tensors, dim=0)
        else:
            raise ValueError(f"Unknown rule kind {rule.kind!r}.")
    return out


def invert_rules(state_dict: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Write an hf_clip state dict in the other layout (the inverse of `apply_rules`)."""
    missing = [rule.target for rule in rules if rule.target not in state_dict]
    unexpected = set(state_dict) - {rule.target for rule in rules}
    if missing or unexpected:
        raise ConversionError(
            f"The hf_clip state dict does not match its config (missing: {_summary(missing) or 'none'}; "
            f"unexpected: {_summary(unexpected) or 'none'})."
        )
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = state_dict[rule.target]
        if rule.kind == "copy":
            out[rule.sources[0]] = tensor
        elif rule.kind == "transpose":
            out[rule.sources[0]] = tensor.t().contiguous()
        elif rule.kind == "concat":
            for source, part in zip(rule.sources, tensor.chunk(len(rule.sources), dim=0), strict=True):
                out[source] = part.contiguous()
        else:
            raise ValueError(f"Unknown rule kind {rule.kind!r}.")
    return out


def check_shapes(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str = "checkpoint"
) -> None:
    """Compare names and shapes with a (meta-device) model's state dict; raise naming every difference."""
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    mis_shaped = [
        f"{name} {tuple(state_dict[name].shape)} != {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(state_dict))
        if state_dict[name].shape != expected[name].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing: {_summary(missing)}")
        if unexpected:
            problems.append(f"unexpected: {_summary(unexpected)}")
        if mis_shaped:
            problems.append(f"wrong shape (got != expected): {_summary(mis_shaped)}")
        raise ConversionError(f"The converted {what} does not fit the model: {'; '.join(problems)}.")
