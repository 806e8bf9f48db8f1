import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_clip.training import ClipLoss, SigLipLoss, contrastive_accumulation_step


class _ToyTwoTower(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 8))
        self.token_embedding = nn.Embedding(50, 16)
        self.text_head = nn.Sequential(nn.LayerNorm(16), nn.Dropout(dropout), nn.Linear(16, 8))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(self.token_embedding(tokens).mean(1)), dim=-1)


def _batch(size: int = 16):
    generator = torch.Generator().manual_seed(7)
    return torch.randn(size, 12, generator=generator), torch.randint(0, 50, (size, 5), generator=generator)


def _micro_batches(images, tokens, count: int = 4):
    return list(zip(images.chunk(count), tokens.chunk(count)))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_accumulated_gradients_equal_one_big_batch(siglip):
    torch.manual_seed(0)
    model = _ToyTwoTower()
    reference = copy.deepcopy(model)
    images, tokens = _batch()
    loss_fn = SigLipLoss() if siglip else ClipLoss()
    extra = {"logit_bias": model.logit_bias} if siglip else {}

    ref_args = [reference.logit_scale.exp()] + ([reference.logit_bias] if siglip else [])
    ref_loss = loss_fn(reference.encode_image(images), reference.encode_text(tokens), *ref_args)
    ref_loss.backward()

    loss = contrastive_accumulation_step(
        model.encode_image,
        model.encode_text,
        _micro_batches(images, tokens),
        loss_fn,
        model.logit_scale.exp(),
        **extra,
    )
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-6)
    _assert_same_grads(_grads(model), _grads(reference))
    assert model.logit_scale.grad.abs() > 0 and (not siglip or model.logit_bias.grad.abs() > 0)


def test_dropout_masks_are_replayed_in_the_recompute():
    """With dropout, gradients equal a single graph built over the same micro-batch forwards and RNG."""
    model = _ToyTwoTower(dropout=0.5).train()
    reference = copy.deepcopy(model)
    images, tokens = _batch()
    micro_batches = _micro_batches(images, tokens)

    torch.manual_seed(123)
    image_feats, text_feats = [], []
    for image_inputs, text_inputs in micro_batches:
        image_feats.append(reference.encode_image(image_inputs))
        text_feats.append(reference.encode_text(text_inputs))
    ClipLoss()(torch.cat(image_feats), torch.cat(text_feats), reference.logit_scale.exp()).backward()
    state_after_reference = torch.get_rng_state()

    torch.manual_seed(123)
    contrastive_accumulation_step(
        model.encode_image, model.encode_text, micro_batches, ClipLoss(), model.logit_scale.exp()
    )
    _assert_same_grads(_grads(model), _grads(reference))
    assert torch.equal(torch.get_rng_state(), state_after_reference)


def test_custom_backward_is_applied_once_per_micro_batch_and_no_sync_skips_the_last():
    """A loss-scaling backward (like accelerate's with fp16) scales the gradients exactly once."""
    torch.manual_seed(0)
    model = _ToyTwoTower()
    reference = copy.deepcopy(model)
    images, tokens = _batch()
    ClipLoss()(
        reference.encode_image(images), reference.encode_text(tokens), reference.logit_scale.exp()
    ).backward()

    scale, backward_calls, sync_skipped = 1024.0, [], []

    def scaled_backward(loss: torch.Tensor) -> None:
        backward_calls.append(loss.detach())
        (loss * scale).backward()

    @contextlib.contextmanager
    def no_sync():
        sync_skipped.append(len(backward_calls))
        yield

    contrastive_accumulation_step(
        model.encode_image,
        model.encode_text,
        _micro_batches(images, tokens),
        ClipLoss(),
        model.logit_scale.exp(),
        backward=scaled_backward,
        no_sync=no_sync,
    )
    assert len(backward_calls) == 4 and sync_skipped == [0, 1, 2]
    _assert_same_grads({k: v / scale for k, v in _grads(model).items()}, _grads(reference))


def test_batch_norm_statistics_are_updated_once_per_micro_batch():
    """The feature pass runs every micro-batch once more; its BatchNorm updates are undone."""
    torch.manual_seed(0)
    model = _ToyTwoTower()
    model.image_tower.insert(1, nn.BatchNorm1d(32))
    reference = copy.deepcopy(model)
    images, tokens = _batch()
    micro = _micro_batches(images, tokens)
    for image_inputs, _ in micro:  # what plain training on these micro-batches does to the statistics
        reference.encode_image(image_inputs)
    contrastive_accumulation_step(
        model.encode_image, model.encode_text, micro, ClipLoss(), model.logit_scale.exp(), model=model
    )
    for name, buffer in reference.image_tower[1].named_buffers():
        torch.testing.assert_close(getattr(model.image_tower[1], name), buffer, msg=name)


def test_empty_micro_batches_are_rejected():
    model = _ToyTwoTower()
    with pytest.raises(ValueError, match="micro_batches is empty"):
        contrastive_accumulation_step(model.encode_image, model.encode_text, [], ClipLoss(), 10.0)
