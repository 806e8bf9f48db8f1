"""Config, towers and model API; numerical parity with open_clip lives in test_convert.py."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

import hf_clip
from hf_clip import (
    PAPER_MODELS,
    HfClipConfig,
    HfClipModel,
    HfClipTextModel,
    HfClipTextModelWithProjection,
    HfClipVisionConfig,
    HfClipVisionModelWithProjection,
)

EOS = 49407


def tiny_config(vision_type: str = "vit", **kw) -> HfClipConfig:
    vision = (
        dict(vision_type="vit", image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2)
        if vision_type == "vit"
        else dict(vision_type="resnet", image_size=64, hidden_size=16, resnet_layers=[1, 1, 1, 1])
    )
    return HfClipConfig(
        projection_dim=32,
        text_config=dict(hidden_size=64, num_hidden_layers=2, vocab_size=EOS + 1),
        vision_config=vision,
        **kw,
    )


def ids_batch() -> torch.Tensor:
    ids = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((3, 10, 0)):
        ids[row, 0] = 49406
        ids[row, 1 : n + 1] = torch.arange(100, 100 + n)
        ids[row, n + 1] = EOS
    return ids


def pixels(cfg: HfClipConfig, n: int = 3) -> torch.Tensor:
    size = cfg.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name,alias",
    [
        ("ViT-B/32", "ViT-B-32"),
        ("ViT-L/14@336px", "ViT-L-14-336"),
        ("RN50x4", "rn50x4"),
        ("RN50", "RN50-quickgelu"),
    ],
)
def test_preset_spellings(name, alias):
    assert HfClipConfig.from_preset(name).to_dict() == HfClipConfig.from_preset(alias).to_dict()


def test_preset_sizes_match_the_paper():
    # Parameter counts of Radford et al. (2021), built on the meta device so this stays instant.
    expected_millions = {
        "RN50": 102.0,
        "RN101": 119.7,
        "RN50x4": 178.3,
        "RN50x16": 291.0,
        "RN50x64": 623.3,
        "ViT-B/32": 151.3,
        "ViT-B/16": 149.6,
        "ViT-L/14": 427.6,
        "ViT-L/14@336px": 427.9,
    }
    assert list(expected_millions) == list(PAPER_MODELS)
    for name, millions in expected_millions.items():
        with torch.device("meta"):
            model = HfClipModel(HfClipConfig.from_preset(name))
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert round(count, 1) == millions, name


def test_laion_sizes_and_activation():
    big_g = HfClipConfig.from_preset("ViT-bigG-14")
    assert big_g.vision_config.hidden_act == "gelu" and big_g.vision_config.intermediate_size == 8192
    assert big_g.text_config.num_attention_heads == 20 and big_g.projection_dim == 1280
    assert HfClipConfig.from_preset("ViT-H-14-quickgelu").text_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(vision_type="vit", hidden_size=100, num_attention_heads=3), "not divisible"),
        (dict(vision_type="vit", image_size=224, patch_size=30), "does not divide"),
        (dict(vision_type="resnet", image_size=100), "multiple of 32"),
        (dict(vision_type="conv"), "vision_type"),
        (dict(hidden_act="relu"), "hidden_act"),
    ],
)
def test_impossible_sizes_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HfClipVisionConfig(**kwargs)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="Unknown preset 'ViT-Q/7'.*ViT-B/32"):
        HfClipConfig.from_preset("ViT-Q/7")


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_forward_outputs_and_loss(vision_type):
    cfg = tiny_config(vision_type)
    model = HfClipModel(cfg).eval()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-4)
    ids, px = ids_batch(), pixels(cfg)
    out = model(input_ids=ids, pixel_values=px, return_loss=True)
    assert out.logits_per_image.shape == (3, 3) and torch.equal(out.logits_per_image, out.logits_per_text.t())
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    manual = model.logit_scale.exp() * model.get_image_features(px) @ model.get_text_features(ids).t()
    manual = manual / model.get_image_features(px).norm(dim=-1, keepdim=True)
    manual = manual / model.get_text_features(ids).norm(dim=-1)
    assert torch.allclose(out.logits_per_image, manual, atol=1e-5)
    labels = torch.arange(3)
    expected = (
        torch.nn.functional.cross_entropy(manual, labels)
        + torch.nn.functional.cross_entropy(manual.t(), labels)
    ) / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.vision_model_output.pooler_output.shape[0] == 3
    assert isinstance(model(input_ids=ids, pixel_values=px, return_dict=False), tuple)


def test_text_pooling_ignores_padding_style():
    model = HfClipModel(tiny_config()).eval()
    ids = ids_batch()
    eos_padded = ids.clone()
    for row in range(3):
        first = int((ids[row] == EOS).nonzero()[0])
        eos_padded[row, first:] = EOS
    assert torch.allclose(model.get_text_features(ids), model.get_text_features(eos_padded), atol=1e-6)
    # The causal tower never looks past the end-of-text token, so what follows it cannot matter.
    garbage = ids.clone()
    garbage[ids == 0] = 555
    assert torch.allclose(model.get_text_features(ids), model.get_text_features(garbage), atol=1e-6)
    full = model.text_model(garbage).pooler_output  # all 77 positions run, garbage included
    assert torch.allclose(model.text_model(ids).pooler_output, full, atol=1e-6)


def test_trimming_after_end_of_text_changes_no_embedding():
    # Fewer rows change only the GEMMs' blocking: float rounding, within the project's 1e-5 for fp32
    # embeddings (1.3e-6 was seen once against an earlier 1e-6).
    torch.manual_seed(0)
    model = HfClipModel(tiny_config()).eval()
    ids = ids_batch()  # longest caption ends at position 11
    trimmed = model.text_model(ids, trim=True)
    full = model.text_model(ids)
    assert trimmed.last_hidden_state.shape[1] == 12 and full.last_hidden_state.shape[1] == 77
    torch.testing.assert_close(trimmed.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        model.get_text_features(ids), model.text_projection(full.pooler_output), rtol=1e-5, atol=1e-5
    )
    px = pixels(model.config)
    out = model(input_ids=ids, pixel_values=px)
    assert out.text_model_output.last_hidden_state.shape[1] == 12
    with_states = model(input_ids=ids, pixel_values=px, output_hidden_states=True)
    assert with_states.text_model_output.last_hidden_state.shape[1] == 77
    torch.testing.assert_close(out.logits_per_image, with_states.logits_per_image, rtol=1e-5, atol=1e-5)
    # No end-of-text token anywhere: nothing can be trimmed, the last position is read.
    no_eos = torch.randint(1, 1000, (2, 77))
    assert model.text_model(no_eos, trim=True).last_hidden_state.shape[1] == 77
    # The text models users read hidden states from (e.g. diffusion pipelines) always keep all positions.
    text_model = HfClipTextModelWithProjection(model.config.text_config).eval()
    assert text_model(ids).last_hidden_state.shape[1] == 77


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_end_of_text_only_last_block_changes_no_text_embedding(attn):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = HfClipModel(cfg).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():  # random biases, or a wrong row could still give the same output
        for p in model.text_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = ids_batch()  # end-of-text at positions 4, 11 and 1
    ids[ids == 0] = 555  # garbage after it: the per-row causal mask must hide it
    no_eos = torch.randint(1, 1000, (1, 77))  # read at the last position
    for batch in (ids, no_eos):
        full = model.text_model(batch)
        for trim in (False, True):
            pooled = model.text_model(batch, trim=trim, pooled_only=True)
            assert pooled.last_hidden_state.shape[1] == 1
            torch.testing.assert_close(pooled.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-6)
    # Hidden states asked for: every block runs in full.
    states = model.text_model(ids, output_hidden_states=True, pooled_only=True)
    assert states.last_hidden_state.shape[1] == 77
    # Training (eager is also what bf16 training on CPU runs): the same gradients.
    model.train()
    grads = []
    for fn in (model.get_text_features, lambda x: model.text_projection(model.text_model(x).pooler_output)):
        model.zero_grad()
        fn(ids).pow(2).sum().backward()
        grads.append(
            {n: p.grad.clone() for n, p in model.text_model.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_left_padding_is_undone_with_the_attention_mask():
    torch.manual_seed(0)
    model = HfClipModel(tiny_config()).eval()
    right = ids_batch()[:, :12]  # right-padded with 0, as the tokenizer's padding_side="right" returns
    right_mask = (torch.arange(12) <= (right == EOS).int().argmax(-1, keepdim=True)).long()
    lengths = right_mask.sum(-1, keepdim=True)
    shift = (torch.arange(12) - (12 - lengths)) % 12  # the same rows, padded on the left instead
    left, left_mask = right.gather(1, shift), right_mask.gather(1, shift)
    assert left[2, :10].eq(0).all() and left_mask[2].tolist() == [0] * 10 + [1, 1]
    expected = model.get_text_features(right)
    torch.testing.assert_close(model.get_text_features(left, attention_mask=left_mask), expected)
    torch.testing.assert_close(model.get_text_features(right, attention_mask=right_mask), expected)
    assert not torch.allclose(model.get_text_features(left), expected, atol=1e-3)  # the mask is needed
    px = pixels(model.config)
    logits = model(input_ids=right, pixel_values=px).logits_per_image
    torch.testing.assert_close(
        model(input_ids=left, pixel_values=px, attention_mask=left_mask).logits_per_image, logits
    )
    text_model = HfClipTextModel(model.config.text_config).eval()
    torch.testing.assert_close(
        text_model(left, attention_mask=left_mask).pooler_output, text_model(right).pooler_output
    )
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.get_text_features(right, attention_mask=right_mask[:, :5])


def test_left_padded_hidden_states_line_up_with_the_input():
    """Left padding is undone inside the tower; the per-position outputs must still line up with the ids and
    the attention mask the caller holds (masked mean pooling, token features), as transformers' do."""
    torch.manual_seed(0)
    cfg = tiny_config()
    right = torch.tensor([[49406, 100, 101, EOS, 0, 0], [49406, 100, 101, 102, 103, EOS]])
    left = torch.tensor([[0, 0, 49406, 100, 101, EOS], [49406, 100, 101, 102, 103, EOS]])
    right_mask, left_mask = (right != 0).long(), (left != 0).long()
    rows = (torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5]))
    left_rows = (rows[0], rows[1] + 2 * (rows[0] == 0))  # the same tokens, two places later in row 0
    text_model = HfClipTextModel(cfg.text_config).eval()
    model = HfClipModel(cfg).eval()
    model.text_model.load_state_dict(text_model.text_model.state_dict())
    px = pixels(cfg, 2)
    for run in (
        lambda ids, mask: text_model(ids, attention_mask=mask, output_hidden_states=True),
        lambda ids, mask: (
            model(
                input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True
            ).text_model_output
        ),
    ):
        expected, got = run(right, right_mask), run(left, left_mask)
        torch.testing.assert_close(got.pooler_output, expected.pooler_output)
        for a, b in zip(
            (got.last_hidden_state, *got.hidden_states), (expected.last_hidden_state, *expected.hidden_states)
        ):
            torch.testing.assert_close(a[left_rows], b[rows])
        eos = (left == EOS).int().argmax(-1)
        torch.testing.assert_close(got.last_hidden_state[torch.arange(2), eos], got.pooler_output)


def test_left_padded_attentions_line_up_with_the_input():
    """Attention weights of a left-padded batch come back in input order along queries and keys: those of
    the real tokens equal the right-padded batch's, and each real query's weights sum to one over them."""
    torch.manual_seed(0)
    cfg = tiny_config()
    right = torch.tensor([[49406, 100, 101, EOS, 0, 0], [49406, 100, 101, 102, 103, EOS]])
    left = torch.tensor([[0, 0, 49406, 100, 101, EOS], [49406, 100, 101, 102, 103, EOS]])
    text_model = HfClipTextModel(cfg.text_config).eval()
    with torch.no_grad():
        expected = text_model(right, attention_mask=(right != 0).long(), output_attentions=True).attentions
        got = text_model(left, attention_mask=(left != 0).long(), output_attentions=True).attentions
    assert len(got) == cfg.text_config.num_hidden_layers
    for a, b in zip(got, expected):
        torch.testing.assert_close(a[0][:, 2:, 2:], b[0][:, :4, :4])  # row 0: its tokens two places later
        torch.testing.assert_close(a[1], b[1])
        torch.testing.assert_close(a[0][:, 2:, 2:].sum(-1), torch.ones(a.shape[1], 4))


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_output_attentions_under_any_attention_implementation(vision_type):
    """transformers' CLIP returns no weights under SDPA (a warning and an empty tuple); hf_clip runs eager
    attention for the call that asks for them, so the weights come whatever `attn_implementation` is, and
    the embeddings are those of a call without them."""
    torch.manual_seed(0)
    cfg = tiny_config(vision_type)
    model = HfClipModel(cfg).eval()
    assert model.config.text_config._attn_implementation == "sdpa"
    ids, px = ids_batch(), pixels(cfg)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=px)
        out = model(input_ids=ids, pixel_values=px, output_attentions=True)
    torch.testing.assert_close(out.logits_per_image, plain.logits_per_image)
    text = out.text_model_output.attentions
    assert len(text) == 2 and text[0].shape == (3, 1, 77, 77)  # every position: no trimming
    assert torch.all(text[0].triu(1) == 0)  # causal
    vision = out.vision_model_output.attentions
    if vision_type == "vit":
        assert len(vision) == 2 and vision[-1].shape == (3, 1, 17, 17)  # the last block for every token
        assert out.vision_model_output.last_hidden_state.shape[1] == 17
    else:  # the attention pool: the mean token's query against itself and the 2 x 2 grid
        assert len(vision) == 1 and vision[0].shape == (3, cfg.vision_config.num_attention_heads, 1, 5)
    for weights in (*text, *vision):
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    tower = HfClipVisionModelWithProjection(cfg.vision_config).eval()
    with torch.no_grad():
        assert len(tower(px, output_attentions=True).attentions) == len(vision)
        tower.config.output_attentions = False
        assert tower(px).attentions is None


def test_patch_embedding_is_the_convolution_as_one_gemm():
    import torch.nn.functional as F

    from hf_clip.modeling_hf_clip import HfClipPatchEmbedding

    torch.manual_seed(0)
    patch = HfClipPatchEmbedding(3, 16, kernel_size=8, stride=8, bias=False)
    for size in ((32, 32), (35, 42)):  # the convolution drops a remainder; so does the GEMM
        x = torch.randn(2, 3, *size)
        out = patch(x)
        ref = F.conv2d(x, patch.weight, stride=8)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.square().sum(), patch.weight)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), patch.weight)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())
    with pytest.raises(ValueError, match="kernel = stride"):
        HfClipPatchEmbedding(3, 16, kernel_size=8, stride=4)


def test_quick_gelu_in_place_only_where_nothing_can_see_it():
    from hf_clip.modeling_hf_clip import HfClipMLP, QuickGELU

    torch.manual_seed(0)
    mlp = HfClipMLP(HfClipVisionConfig(hidden_size=32, intermediate_size=128, hidden_act="quick_gelu"))
    assert isinstance(mlp.act, QuickGELU)
    x = torch.randn(2, 5, 32)

    def reference(x: torch.Tensor) -> torch.Tensor:
        h = mlp.fc1(x)
        return mlp.fc2(h * torch.sigmoid(1.702 * h))

    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(mlp(x), expected)  # the in-place path is bit-identical
        seen = []
        handle = mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out))
        assert torch.equal(mlp(x), expected)
        handle.remove()
        torch.testing.assert_close(seen[0], mlp.fc1(x), rtol=0, atol=0)  # a hooked output is left alone
        seen.clear()
        handle = mlp.act.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        mlp(x)
        handle.remove()
        torch.testing.assert_close(seen[0], mlp.fc1(x), rtol=0, atol=0)
        # A hook inside a wrapped fc1 (a LoRA layer's base layer returns this very tensor) counts too.
        wrapper = torch.nn.Module()
        wrapper.base_layer = mlp.fc1
        wrapper.forward = lambda x: wrapper.base_layer(x)
        seen.clear()
        handle = wrapper.base_layer.register_forward_hook(lambda m, i, out: seen.append(out))
        mlp.fc1 = wrapper
        assert torch.equal(mlp(x), expected)
        handle.remove()
        mlp.fc1 = wrapper.base_layer
        torch.testing.assert_close(seen[0], mlp.fc1(x), rtol=0, atol=0)
    # With gradients the activation's input is needed for backward: gradients match the plain formula.
    (grad,) = torch.autograd.grad(mlp(x).square().sum(), mlp.fc1.weight)
    (ref_grad,) = torch.autograd.grad(reference(x).square().sum(), mlp.fc1.weight)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_bf16_cpu_training_uses_eager_attention_for_short_sequences(monkeypatch):
    import hf_clip.modeling_hf_clip as modeling

    calls = []
    real = modeling.eager_attention_forward
    monkeypatch.setattr(
        modeling, "eager_attention_forward", lambda *a, **k: calls.append(a[1].shape[-2]) or real(*a, **k)
    )
    cfg = tiny_config()
    model = HfClipModel(cfg).train()
    ids, px = ids_batch(), pixels(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, pixel_values=px, return_loss=True).loss.backward()
    assert len(calls) == 4  # two text and two image layers
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # inference keeps SDPA
        model.eval()(input_ids=ids, pixel_values=px)
    model.train()
    model(input_ids=ids, pixel_values=px, return_loss=True).loss.backward()  # fp32 keeps SDPA
    assert calls == []
    q = torch.zeros(1, 1, 78, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not modeling._slow_cpu_sdpa_backward(q)  # longer than the text context: SDPA


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_class_token_only_last_block_changes_no_image_embedding(attn):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.vision_config.num_attention_heads = 4
    model = HfClipModel(cfg).eval()
    model.set_attn_implementation(attn)
    assert model.vision_model.config._attn_implementation == attn
    with torch.no_grad():  # random class token and biases, or the test could pass with a broken slice
        for p in model.vision_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    px = pixels(cfg)
    full = model.vision_model(px)
    pooled = model.vision_model(px, pooled_only=True)
    assert full.last_hidden_state.shape[1] == 17 and pooled.last_hidden_state.shape[1] == 1
    torch.testing.assert_close(pooled.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        pooled.last_hidden_state[:, 0], full.last_hidden_state[:, 0], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        model.get_image_features(px), model.visual_projection(full.pooler_output), rtol=1e-5, atol=1e-6
    )
    # The joint forward too (training runs it); hidden states asked for, every token.
    ids = ids_batch()
    out = model(input_ids=ids, pixel_values=px)
    assert out.vision_model_output.last_hidden_state is None  # not a tensor silently missing its patch tokens
    with_states = model(input_ids=ids, pixel_values=px, output_hidden_states=True)
    assert with_states.vision_model_output.last_hidden_state.shape[1] == 17
    torch.testing.assert_close(out.logits_per_image, with_states.logits_per_image, rtol=1e-5, atol=1e-5)
    # Hidden states asked for: every block runs in full.
    states = model.vision_model(px, output_hidden_states=True, pooled_only=True)
    assert states.last_hidden_state.shape[1] == 17 and len(states.hidden_states) == 3
    # Training through get_image_features (GradCache does): the same gradients.
    model.train()
    grads = []
    for fn in (
        model.get_image_features,
        lambda x: model.visual_projection(model.vision_model(x).pooler_output),
    ):
        model.zero_grad()
        fn(px).pow(2).sum().backward()
        grads.append(
            {n: p.grad.clone() for n, p in model.vision_model.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():  # float rounding: within 1e-5 of each gradient's scale
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # bf16 autocast inference.
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(
            model.get_image_features(px).float(),
            model.visual_projection(model.vision_model(px).pooler_output).float(),
            rtol=0.05,
            atol=0.05,
        )
    # The ResNet tower takes the flag for a common interface; its attention pool is already query-only.
    resnet = HfClipModel(tiny_config("resnet")).eval()
    rpx = pixels(resnet.config)
    torch.testing.assert_close(
        resnet.vision_model(rpx, pooled_only=True).pooler_output, resnet.vision_model(rpx).pooler_output
    )


def test_trim_length_is_queued_before_the_image_tower_and_read_after_it(monkeypatch):
    """On a GPU, reading the trim length right after the image tower would leave the GPU idle while the
    host queues the text tower; the joint forward asks for it first and reads it only when needed."""
    from hf_clip import modeling_hf_clip

    events = []
    real_init, real_get = modeling_hf_clip.TrimLength.__init__, modeling_hf_clip.TrimLength.get

    def init(self, index):
        events.append("length queued")
        real_init(self, index)

    def get(self):
        events.append("length read")
        return real_get(self)

    monkeypatch.setattr(modeling_hf_clip.TrimLength, "__init__", init)
    monkeypatch.setattr(modeling_hf_clip.TrimLength, "get", get)
    model = HfClipModel(tiny_config()).train()
    model.vision_model.register_forward_hook(lambda *_: events.append("image tower done"))
    out = model(input_ids=ids_batch(), pixel_values=pixels(model.config), return_loss=True)
    assert events == ["length queued", "image tower done", "length read"]
    assert out.text_model_output.last_hidden_state.shape[1] == 12
    out.loss.backward()
    assert model.text_model.encoder.layers[0].mlp.fc1.weight.grad is not None
    assert modeling_hf_clip.TrimLength(torch.tensor([3, 11, 7])).get() == 12


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_eager_equals_sdpa(vision_type):
    cfg = tiny_config(vision_type)
    sdpa = HfClipModel(cfg).eval()
    eager = HfClipModel(cfg).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    assert eager.text_model.config._attn_implementation == "eager"
    ids, px = ids_batch(), pixels(cfg)
    assert torch.allclose(sdpa.get_text_features(ids), eager.get_text_features(ids), atol=1e-5)
    assert torch.allclose(sdpa.get_image_features(px), eager.get_image_features(px), atol=1e-5)


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_gradient_checkpointing_same_gradients(vision_type):
    cfg = tiny_config(vision_type)
    ids, px = ids_batch(), pixels(cfg)
    grads = []
    model = HfClipModel(cfg).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for checkpointing in (False, True):
        model.load_state_dict(state)
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, pixel_values=px, return_loss=True).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model.text_model.encoder.layers[0].gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_updates_batch_norm_statistics_once(use_reentrant):
    """The backward pass recomputes each checkpointed ResNet block: its batch norms must not fold the batch
    into their running statistics a second time (gradients alone cannot show this)."""
    torch.manual_seed(0)
    cfg = tiny_config("resnet")
    ids, px = ids_batch(), pixels(cfg)
    model = HfClipModel(cfg).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    originals = dict(model.named_buffers())
    buffers = []
    for checkpointing in (False, True):
        model.load_state_dict(state)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
            )
        for _ in range(2):
            model(
                input_ids=ids, pixel_values=px.requires_grad_(use_reentrant), return_loss=True
            ).loss.backward()
        buffers.append({k: v.clone() for k, v in model.named_buffers() if "running" in k or "batches" in k})
    for name, value in buffers[0].items():
        torch.testing.assert_close(buffers[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert all(buffer is originals[name] for name, buffer in model.named_buffers())  # not left swapped


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_adapters_train_with_reentrant_checkpointing(vision_type):
    """A frozen tower with a trainable adapter: `enable_input_require_grads` must find each tower's input
    layer, or reentrant checkpointing cuts the adapter's gradient (as for transformers' CLIPVisionModel)."""
    from hf_clip import HfClipVisionModel

    cfg = tiny_config(vision_type)
    for model in (HfClipVisionModel(cfg.vision_config), HfClipModel(cfg)):
        model.train().requires_grad_(False)
        vision = model.vision_model
        # (A ResNet block's last batch norm starts at zero, which zeroes its convolutions' gradients.)
        last = vision.encoder.layers[-1].mlp.fc1 if vision_type == "vit" else vision.layer4[-1].bn3
        adapter = last.weight.requires_grad_(True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        if isinstance(model, HfClipModel):
            out = model(input_ids=ids_batch(), pixel_values=pixels(cfg), return_loss=True).loss
        else:
            out = model(pixels(cfg)).pooler_output.pow(2).sum()
        assert out.requires_grad, type(model).__name__
        out.backward()
        assert adapter.grad is not None and adapter.grad.abs().sum() > 0, type(model).__name__


@pytest.mark.parametrize("vision_type,size", [("vit", 48), ("resnet", 96)])
def test_position_interpolation(vision_type, size):
    cfg = tiny_config(vision_type)
    model = HfClipModel(cfg).eval()
    px = torch.randn(2, 3, size, size)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(px)
    assert model.get_image_features(px, interpolate_pos_encoding=True).shape == (2, 32)
    # At the native size interpolation is the identity.
    native = pixels(cfg, 2)
    assert torch.allclose(
        model.get_image_features(native), model.get_image_features(native, interpolate_pos_encoding=True)
    )


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_wrong_pixel_layout_is_named(vision_type):
    cfg = tiny_config(vision_type)
    model = HfClipModel(cfg).eval()
    size = cfg.vision_config.image_size
    for bad in (torch.randn(2, 1, size, size), torch.randn(2, 4, size, size), torch.randn(3, size, size)):
        with pytest.raises(ValueError, match=r"takes \[batch, 3, height, width\]"):
            model.get_image_features(bad)
        with pytest.raises(ValueError, match="num_channels=3"):
            model(input_ids=ids_batch()[:2], pixel_values=bad)


def test_too_long_text_raises():
    model = HfClipModel(tiny_config())
    with pytest.raises(ValueError, match="truncation=True"):
        model.get_text_features(torch.ones(1, 78, dtype=torch.long))
    short = tiny_config()
    short.text_config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="context is 16; tokenize with truncation=True, max_length=16"):
        HfClipModel(short).get_text_features(torch.ones(1, 20, dtype=torch.long))


def test_auto_classes_save_load_and_dtype(tmp_path):
    cfg = tiny_config()
    model = HfClipModel(cfg).eval()
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForZeroShotImageClassification"] == "modeling_hf_clip.HfClipModel"
    assert (tmp_path / "modeling_hf_clip.py").exists() and (tmp_path / "configuration_hf_clip.py").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HfClipConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    ids = ids_batch()
    assert torch.equal(loaded.get_text_features(ids), model.get_text_features(ids))
    bf16 = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.get_image_features(pixels(cfg)).dtype == torch.bfloat16
    text = HfClipTextModelWithProjection.from_pretrained(tmp_path).eval()
    assert torch.allclose(text(ids).text_embeds, model.get_text_features(ids), atol=1e-6)
    vision = HfClipVisionModelWithProjection.from_pretrained(tmp_path).eval()
    assert torch.allclose(vision(pixels(cfg)).image_embeds, model.get_image_features(pixels(cfg)), atol=1e-6)
    assert HfClipTextModel.from_pretrained(tmp_path)(ids).pooler_output.shape == (3, 64)


def test_remote_code_loads_without_hf_clip(tmp_path):
    model = HfClipModel(tiny_config("resnet")).eval()
    model.save_pretrained(tmp_path)
    expected = model.get_image_features(pixels(model.config)).tolist()
    script = f"""
import sys, json, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'hf_clip':
            raise ImportError('hf_clip is blocked in this interpreter')
sys.meta_path.insert(0, Block())
try:
    import hf_clip
    raise SystemExit('hf_clip should not be importable here')
except ImportError:
    pass
from transformers import AutoModelForZeroShotImageClassification
model = AutoModelForZeroShotImageClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
print(type(model).__module__)
print(json.dumps(model.get_image_features(px).tolist()))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path.parent)
    assert run.returncode == 0, run.stderr
    module, values = run.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules")
    assert torch.allclose(torch.tensor(json.loads(values)), torch.tensor(expected), atol=1e-6)


def test_everything_public_is_exported():
    for name in hf_clip.__all__:
        assert getattr(hf_clip, name) is not None


def test_patch_dropout_only_while_training():
    cfg = tiny_config()
    cfg.vision_config.patch_dropout = 0.5
    model = HfClipModel(cfg)
    px = pixels(cfg, 2)
    model.train()
    hidden = model.vision_model(px).last_hidden_state
    assert hidden.shape[1] == 1 + 16 // 2  # class token + half of the 4x4 patches
    two = model.vision_model(px).last_hidden_state
    assert not torch.equal(hidden, two)  # a fresh subset each call
    model.eval()
    assert model.vision_model(px).last_hidden_state.shape[1] == 17
    with pytest.raises(ValueError, match="patch_dropout"):
        HfClipVisionConfig(patch_dropout=1.0)


class _Scale(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 3 * weight


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_autocast_inference_keeps_cast_weights_until_they_change(vision_type):
    from hf_clip.modeling_hf_clip import HfClipLinear

    cfg = tiny_config(vision_type)
    # Frozen, so that with gradients enabled (no kept casts) attention still takes inference's SDPA kernel.
    model = HfClipModel(cfg).eval().requires_grad_(False)
    ids, px = ids_batch(), pixels(cfg)

    def embed(grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.get_image_features(px).detach(), model.get_text_features(ids).detach()

    reference = embed(grad=True)  # autocast's own casts, nothing kept
    fc1 = model.text_model.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, HfClipLinear) and fc1._cast is None
    first, second = embed(), embed()
    assert fc1._cast is not None and fc1._cast[3].dtype == torch.bfloat16
    for a, b, c in zip(reference, first, second):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b) and torch.equal(b, c)
    # An in-place update (an optimizer step, load_state_dict) is seen at once.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(embed(), embed(grad=True), rtol=0, atol=0)
    state = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(embed(), embed(grad=True), rtol=0, atol=0)
    # New tensors put in place (which may reuse a freed one's address) are seen too.
    for layer in (m for m in model.modules() if isinstance(m, HfClipLinear) and m.bias is not None):
        layer.bias = torch.nn.Parameter(layer.bias.detach() + 0.25, requires_grad=False)
    torch.testing.assert_close(embed(), embed(grad=True), rtol=0, atol=0)
    # Writes through .data bypass the version counter; eval() (any train() call) drops the kept casts.
    for p in model.parameters():
        p.data.mul_(0.5)
    model.eval()
    torch.testing.assert_close(embed(), embed(grad=True), rtol=0, atol=0)
    # A parametrized weight is recomputed on every access: never kept.
    from torch.nn.utils import parametrize

    proj = model.text_projection
    before = embed()
    parametrize.register_parametrization(proj, "weight", _Scale())
    after = embed()
    torch.testing.assert_close(after, embed(grad=True), rtol=0, atol=0)
    torch.testing.assert_close(after[1], 3 * before[1], rtol=0.05, atol=1e-2)  # bf16 rounding
    parametrize.remove_parametrizations(proj, "weight")
    # Training mode and fp32 inference keep nothing.
    model.train()
    assert fc1._cast is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.get_text_features(ids)
    assert fc1._cast is None
    model.eval()
    with torch.no_grad():
        model.get_text_features(ids)
    assert fc1._cast is None
    # Weights that accelerate loads on demand (device_map offloading) are never kept.
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(fc1, AlignDevicesHook(io_same_device=True))
    embed()
    assert fc1._cast is None


@pytest.mark.parametrize("cpu_memory", ["60KB", "400KB"])
def test_device_map_offloading_gives_the_same_numbers(tmp_path, cpu_memory):
    """With weights offloaded to disk, accelerate's hooks load each module's weights when it is CALLED: the
    embeddings are modules of their own, and their position tables are looked up, not read directly."""
    cfg = tiny_config()
    model = HfClipModel(cfg).eval()
    model.save_pretrained(tmp_path / "model")
    offloaded = HfClipModel.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": cpu_memory}, offload_folder=tmp_path / "off"
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    ids, px = ids_batch(), pixels(cfg)
    with torch.no_grad():
        expected, got = model(input_ids=ids, pixel_values=px), offloaded(input_ids=ids, pixel_values=px)
        torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(offloaded.get_text_features(ids), model.get_text_features(ids))


def test_resize_token_embeddings_round_trips(tmp_path):
    model = HfClipModel(tiny_config())
    model.resize_token_embeddings(EOS + 11)
    assert model.config.text_config.vocab_size == model.text_model.config.vocab_size == EOS + 11
    model.save_pretrained(tmp_path)
    reloaded = HfClipModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match=f"would drop the special token id {EOS}"):
        model.resize_token_embeddings(1000)  # would save a folder that no longer loads
    assert model.config.text_config.vocab_size == EOS + 11


def test_vit_last_hidden_state_is_none_in_every_view_of_the_output():
    """Without hidden states a ViT's last block runs for the class token alone, so `last_hidden_state` is
    None: the attribute, the dict, integer indexing and the tuple form must agree, not hold [batch, 1, width]."""
    cfg = tiny_config()
    model = HfClipModel(cfg).eval()
    ids, px = ids_batch(), pixels(cfg)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
        vision = out.vision_model_output
        assert vision.last_hidden_state is None and "last_hidden_state" not in vision
        assert list(vision.keys()) == ["pooler_output"] and vision[0] is vision.pooler_output
        as_tuple = model(input_ids=ids, pixel_values=px, return_dict=False)
        assert len(as_tuple[5]) == 1 and torch.equal(as_tuple[5][0], vision.pooler_output)
        full = model(input_ids=ids, pixel_values=px, output_hidden_states=True).vision_model_output
        assert full.last_hidden_state.shape == (3, 17, 64) and full[0] is full.last_hidden_state


def test_call_conventions_of_transformers():
    """return_dict / output_hidden_states follow the config when not given; what cannot be honoured raises."""
    from hf_clip import HfClipVisionModel

    cfg = tiny_config()
    model = HfClipModel(cfg).eval()
    ids, px = ids_batch(), pixels(cfg)
    with torch.no_grad():
        as_tuple = model(input_ids=ids, pixel_values=px, return_dict=False)
        # transformers' CLIPOutput layout: logits_per_image, logits_per_text, text_embeds, image_embeds, towers.
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 6 and isinstance(as_tuple[4], tuple)
        assert torch.equal(as_tuple[0], model(input_ids=ids, pixel_values=px).logits_per_image)
        model.config.output_hidden_states = True
        assert len(model(input_ids=ids, pixel_values=px).vision_model_output.hidden_states) == 3
        model.config.output_hidden_states = False
        for tower, inputs in (
            (HfClipTextModelWithProjection(cfg.text_config), ids),
            (HfClipVisionModelWithProjection(cfg.vision_config), px),
            (HfClipVisionModel(cfg.vision_config), px),
        ):
            out = tower.eval()(inputs, return_dict=False)
            assert isinstance(out, tuple) and torch.equal(out[0], tower(inputs)[0])
            tower.config.return_dict = False
            assert isinstance(tower(inputs), tuple)
        with pytest.raises(ValueError, match="position_ids is not supported"):
            model(input_ids=ids, pixel_values=px, position_ids=torch.arange(77))
        # The feature methods too: transformers' get_text_features uses position_ids; ignoring them would
        # return embeddings for positions the caller did not ask for.
        with pytest.raises(ValueError, match="position_ids is not supported"):
            model.get_text_features(ids, position_ids=torch.arange(77).flip(0).expand(3, -1))
        for features, inputs in ((model.get_text_features, ids), (model.get_image_features, px)):
            with pytest.raises(ValueError, match="output_attentions is not supported"):
                features(inputs, output_attentions=True)


def test_initialisation_follows_the_released_code_and_fills_missing_weights(tmp_path):
    """Fresh models get `_init_weights`' scheme (transformers skips parameter-less parent modules of code
    outside its package unless told otherwise), and weights a checkpoint lacks are initialised, not left as
    uninitialised memory."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = HfClipModel(cfg)
    text_layer = model.text_model.encoder.layers[0]
    width, layers = cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers
    assert text_layer.self_attn.qkv_proj.weight.std().item() == pytest.approx(width**-0.5, rel=0.1)
    out_std = width**-0.5 * (2 * layers) ** -0.5
    assert text_layer.self_attn.out_proj.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert text_layer.mlp.fc1.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.1)
    for bias in (text_layer.self_attn.qkv_proj.bias, text_layer.mlp.fc1.bias):
        assert bias.abs().max().item() == 0
    token_embedding = model.text_model.embeddings.token_embedding.weight
    assert token_embedding.std().item() == pytest.approx(0.02, rel=0.1)  # OpenAI's, the default
    cfg_unit = tiny_config()
    cfg_unit.text_config.token_embedding_std = 1.0  # the tiny demo model's
    unit = HfClipModel(cfg_unit).text_model.embeddings.token_embedding.weight
    assert unit.std().item() == pytest.approx(1.0, rel=0.1)
    scale = cfg.vision_config.hidden_size**-0.5
    embeddings = model.vision_model.embeddings
    assert embeddings.class_embedding.std().item() == pytest.approx(scale, rel=0.3)
    assert embeddings.position_embedding.weight.std().item() == pytest.approx(scale, rel=0.2)
    resnet = HfClipModel(tiny_config("resnet"))
    bottleneck = next(m for m in resnet.modules() if type(m).__name__ == "HfClipBottleneck")
    assert bottleneck.bn3.weight.abs().max().item() == 0  # each residual block starts as the identity

    model.save_pretrained(tmp_path)
    saved = dict(model.state_dict())
    # A new projection size and an extra vision layer: those weights are initialised, the rest loaded.
    grown = HfClipModel.from_pretrained(tmp_path, projection_dim=48, ignore_mismatched_sizes=True)
    assert grown.text_projection.weight.shape == (48, width)
    assert grown.text_projection.weight.std().item() == pytest.approx(width**-0.5, rel=0.2)
    torch.testing.assert_close(
        grown.text_model.encoder.layers[0].mlp.fc1.weight, saved["text_model.encoder.layers.0.mlp.fc1.weight"]
    )
    deeper_config = HfClipConfig.from_pretrained(tmp_path)
    deeper_config.vision_config.num_hidden_layers = 3
    deeper = HfClipModel.from_pretrained(tmp_path, config=deeper_config)
    new_layer = deeper.vision_model.encoder.layers[2]
    assert new_layer.self_attn.qkv_proj.weight.abs().max().item() < 1
    assert new_layer.self_attn.qkv_proj.bias.abs().max().item() == 0
    assert new_layer.layer_norm1.weight.eq(1).all()
    features = deeper.get_image_features(pixels(cfg))
    assert torch.isfinite(features).all()
