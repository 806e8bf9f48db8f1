import math

import pytest
import torch
from torch import nn

from hf_clip.training import (
    clamp_logit_scale,
    cosine_schedule_with_warmup,
    create_optimizer,
    param_groups,
    weight_decay_split,
)


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(20, 8)
        self.position_embedding = nn.Embedding(5, 8)


class _VisionEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(8))
        self.patch_embedding = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
        self.position_embedding = nn.Embedding(5, 8)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(8)
        self.mlp = _Mlp()


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])


class _TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()
        self.final_layer_norm = nn.LayerNorm(8)


class _AttentionPool(nn.Module):
    """OpenAI-layout ResNet attention pool: a raw 2-D positional embedding next to linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(5, 8))
        self.q_proj = nn.Linear(8, 8)


class _VisionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _VisionEmbeddings()
        self.encoder = _Encoder()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.attnpool = _AttentionPool()


class _ToyClip(nn.Module):
    """Parameter names as in the hf_clip model (plus a ResNet stem and OpenAI-style raw projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.text_model = _TextModel()
        self.vision_model = _VisionModel()
        self.text_projection = nn.Linear(8, 4, bias=False)
        self.visual_projection = nn.Linear(8, 4, bias=False)
        self.raw_projection = nn.Parameter(torch.zeros(8, 4))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


EXPECTED_DECAYED = {
    "text_model.encoder.layers.0.mlp.fc1.weight",
    "text_model.encoder.layers.0.mlp.fc2.weight",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "vision_model.encoder.layers.0.mlp.fc2.weight",
    "vision_model.conv1.weight",
    "vision_model.attnpool.q_proj.weight",
    "text_projection.weight",
    "visual_projection.weight",
    "raw_projection",
}
EXPECTED_EXEMPT = {
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.encoder.layers.0.layer_norm1.weight",
    "text_model.encoder.layers.0.layer_norm1.bias",
    "text_model.encoder.layers.0.mlp.fc1.bias",
    "text_model.encoder.layers.0.mlp.fc2.bias",
    "text_model.final_layer_norm.weight",
    "text_model.final_layer_norm.bias",
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.encoder.layers.0.layer_norm1.weight",
    "vision_model.encoder.layers.0.layer_norm1.bias",
    "vision_model.encoder.layers.0.mlp.fc1.bias",
    "vision_model.encoder.layers.0.mlp.fc2.bias",
    "vision_model.bn1.weight",
    "vision_model.bn1.bias",
    "vision_model.attnpool.positional_embedding",
    "vision_model.attnpool.q_proj.bias",
    "logit_scale",
}


def test_weight_decay_split_exempts_gains_biases_embeddings_and_temperature():
    decayed, exempt = weight_decay_split(_ToyClip())
    assert set(decayed) == EXPECTED_DECAYED
    assert set(exempt) == EXPECTED_EXEMPT  # frozen parameters are left out entirely


def test_param_groups_carry_the_decay_and_cover_every_trainable_parameter_once():
    model = _ToyClip()
    groups = param_groups(model, weight_decay=0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert len(groups[0]["params"]) == len(EXPECTED_DECAYED)


def test_split_sees_through_wrappers():
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    decayed, _ = weight_decay_split(Wrapper(_ToyClip()))
    assert set(decayed) == EXPECTED_DECAYED


@pytest.mark.parametrize("tower, betas, eps", [("vit", (0.9, 0.98), 1e-6), ("resnet", (0.9, 0.999), 1e-8)])
def test_create_optimizer_uses_the_paper_hyperparameters(tower, betas, eps):
    optimizer = create_optimizer(_ToyClip(), lr=5e-4, weight_decay=0.2, tower=tower)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["betas"] == betas and group["eps"] == eps and group["lr"] == 5e-4
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]


def test_create_optimizer_rejects_unknown_tower():
    with pytest.raises(ValueError, match="tower must be one of"):
        create_optimizer(_ToyClip(), lr=1e-3, tower="convnext")


def test_exempt_parameters_are_not_decayed_by_a_step():
    model = _ToyClip()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    optimizer = create_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.all(params[n] == 1.0) for n in EXPECTED_EXEMPT)
    assert all(torch.allclose(params[n], torch.tensor(1.0 - 0.1 * 0.5)) for n in EXPECTED_DECAYED)


def test_cosine_schedule_with_warmup():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_schedule_with_warmup(optimizer, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[12:] == pytest.approx([0.1, 0.1])


def test_cosine_schedule_rejects_bad_lengths():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule_with_warmup(optimizer, warmup_steps=10, total_steps=5)


def test_clamp_logit_scale():
    model = _ToyClip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(20.0)  # below the cap: untouched
    with pytest.raises(AttributeError, match="logit_scale"):
        clamp_logit_scale(nn.Linear(2, 2))
