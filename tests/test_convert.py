"""Checkpoint conversion: OpenAI / open_clip (TorchScript, .pt, .safetensors) and transformers into hf_clip and
back out to transformers, proven by equal outputs on identical inputs (fp32, eval mode)."""

import argparse
import copy
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from hf_clip import HfClipModel
from hf_clip.convert.api import convert_checkpoint
from hf_clip.convert.cli import add_convert_parser
from hf_clip.convert.rules import ConversionError
from hf_clip.image_processing_hf_clip import HfClipImageProcessor
from hf_clip.processing_hf_clip import HfClipProcessor
from hf_clip.tokenization_hf_clip import HfClipTokenizer

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, convert_weights_to_lp  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")

ARCHITECTURES = [
    "RN50-quickgelu",
    "RN101-quickgelu",
    "RN50x4-quickgelu",
    "RN50x16-quickgelu",
    "RN50x64-quickgelu",
    "ViT-B-32-quickgelu",
    "ViT-B-16-quickgelu",
    "ViT-L-14-quickgelu",
    "ViT-L-14-336-quickgelu",
]
# Shrunk vocabulary: <start_of_text> = 998, <end_of_text> = 999 (the highest id, as in CLIP's BPE).
VOCAB = 1000
REL_TOL = 1e-5
CAPTIONS = ["a photo of a cat.", "Two dogs, running on the beach!", "naïve café &amp; 42"]


def _shrunk_config(name: str) -> dict:
    """open_clip's config for `name` with the same structure at a fraction of the size.

    Widths / 8 (heads stay width / 64, at least 1), ResNet stages ceil(depth / 8) blocks, ViTs 2 layers,
    the real patch sizes, and a few-patch image grid that keeps the ordering of the real input sizes.
    """
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if isinstance(vision["layers"], list):
        grid = vision["image_size"] // 32
        vision.update(
            layers=[-(-n // 8) for n in vision["layers"]],
            width=vision["width"] // 8,
            image_size=32 * max(2, grid // 3),
        )
    else:
        grid = vision["image_size"] // vision["patch_size"]
        vision.update(layers=2, width=vision["width"] // 8, image_size=vision["patch_size"] * (grid // 6 + 1))
    width = text["width"] // 8
    text.update(width=width, heads=max(1, width // 64), layers=2, vocab_size=VOCAB)
    cfg["embed_dim"] //= 8
    return cfg


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, LayerNorm affine terms and temperature."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.num_batches_tracked.fill_(11)
            elif isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
        model.logit_scale.fill_(3.1)
    return model.eval()


def _reference(cfg: dict, quick_gelu: bool = True, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return _randomize(CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=quick_gelu))


def _texts(batch: int = 3, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    """<start> tokens <end> then zero padding, with different lengths."""
    generator = torch.Generator().manual_seed(seed)
    texts = torch.zeros(batch, 77, dtype=torch.long)
    for row, length in enumerate(torch.randint(1, 70, (batch,), generator=generator).tolist()):
        texts[row, 0] = vocab - 2
        texts[row, 1 : length + 1] = torch.randint(1, vocab - 2, (length,), generator=generator)
        texts[row, length + 1] = vocab - 1
    return texts


def _images(size: int, batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error < REL_TOL, f"{what}: relative error {error:.2e}"


class _Expected:
    """open_clip's outputs on fixed inputs, computed once and compared with every converted model."""

    def __init__(self, reference: CLIP, image_size: int, vocab: int = VOCAB) -> None:
        self.images, self.texts = _images(image_size), _texts(vocab=vocab)
        with torch.no_grad():
            self.image = reference.encode_image(self.images)
            self.text = reference.encode_text(self.texts)
            scale = reference.logit_scale.exp()
        self.logits = scale * F.normalize(self.image, dim=-1) @ F.normalize(self.text, dim=-1).t()

    def check(self, model: HfClipModel, feature_api: bool = True) -> None:
        """Logits and normalised embeddings from forward; unnormalised features from get_*_features."""
        with torch.no_grad():
            out = model(input_ids=self.texts, pixel_values=self.images)
            if feature_api:
                _assert_close(model.get_image_features(self.images), self.image, "image features")
                _assert_close(model.get_text_features(self.texts), self.text, "text features")
        _assert_close(out.logits_per_image, self.logits, "logits")
        _assert_close(out.image_embeds, F.normalize(self.image, dim=-1), "image embeds")
        _assert_close(out.text_embeds, F.normalize(self.text, dim=-1), "text embeds")


def _assert_parity(reference: CLIP, model: HfClipModel, image_size: int, vocab: int = VOCAB) -> None:
    _Expected(reference, image_size, vocab).check(model)


def _save_torchscript(reference: CLIP, path, cfg: dict) -> None:
    """Like OpenAI's releases: a TorchScript archive with most weights in float16 and three int buffers.

    The reference then takes the float16-rounded values back, so every format holds the same numbers.
    """
    half = copy.deepcopy(reference)
    convert_weights_to_lp(half, torch.float16)
    image_size = cfg["vision_cfg"]["image_size"]
    for key, value in (("input_resolution", image_size), ("context_length", 77), ("vocab_size", VOCAB)):
        if hasattr(half, key):  # open_clip keeps these as plain ints
            delattr(half, key)
        half.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.script(half), str(path))
    own = reference.state_dict()
    reference.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in half.state_dict().items() if k in own}
    )


def _check_config(model: HfClipModel, cfg: dict) -> None:
    vision, text, config = cfg["vision_cfg"], cfg["text_cfg"], model.config
    assert config.projection_dim == cfg["embed_dim"]
    assert config.vision_config.image_size == vision["image_size"]
    assert config.vision_config.hidden_size == vision["width"]
    if isinstance(vision["layers"], list):
        assert config.vision_config.vision_type == "resnet"
        assert config.vision_config.resnet_layers == vision["layers"]
        assert config.vision_config.num_attention_heads == vision["width"] * 32 // 64
    else:
        assert config.vision_config.vision_type == "vit"
        assert config.vision_config.patch_size == vision["patch_size"]
        assert config.vision_config.num_hidden_layers == vision["layers"]
    assert config.text_config.hidden_size == text["width"]
    assert config.text_config.num_attention_heads == text["heads"]
    assert config.text_config.num_hidden_layers == text["layers"]
    assert config.text_config.vocab_size == VOCAB and config.text_config.eos_token_id == VOCAB - 1
    assert config.text_config.hidden_act == config.vision_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_openai_and_open_clip_checkpoints(tmp_path, name):
    cfg = _shrunk_config(name)
    reference = _reference(cfg)
    _save_torchscript(reference, tmp_path / "openai.pt", cfg)
    state_dict = reference.state_dict()
    # open_clip training checkpoints wrap the weights and, after DDP, prefix them with "module."
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, tmp_path / "oc.pt"
    )
    # A model saved while wrapped by torch.compile carries "_orig_mod." in every name.
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in state_dict.items()}, tmp_path / "oc.safetensors")
    expected = _Expected(reference, cfg["vision_cfg"]["image_size"])
    for source in ("openai.pt", "oc.pt", "oc.safetensors"):
        out = convert_checkpoint(tmp_path / source, tmp_path / f"hf-{source}", processor=False)
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        model = HfClipModel.from_pretrained(out).eval()
        _check_config(model, cfg)
        expected.check(model, feature_api=source == "openai.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_full_size_open_clip_checkpoints(tmp_path, name):
    torch.manual_seed(0)
    reference = _randomize(open_clip.create_model(name, pretrained=None))
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")
    out = convert_checkpoint(tmp_path / "model.safetensors", tmp_path / "out")
    model = HfClipModel.from_pretrained(out).eval()
    assert model.config.vision_config.image_size == size
    _assert_parity(reference, model, size, vocab=49408)


def test_activation_option_and_cli(tmp_path, capsys):
    cfg = _shrunk_config("ViT-B-32-quickgelu")
    reference = _reference(cfg, quick_gelu=False)  # an open_clip model trained with exact GELU
    torch.save(reference.state_dict(), tmp_path / "gelu.pt")
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["convert", str(tmp_path / "gelu.pt"), str(tmp_path / "out"), "--gelu", "--no-processor"]
    )
    assert args.func(args) == 0
    model = HfClipModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.text_config.hidden_act == model.config.vision_config.hidden_act == "gelu"
    _assert_parity(reference, model, cfg["vision_cfg"]["image_size"])
    capsys.readouterr()
    assert args.func(args) == 2  # one line naming the problem and the CLI flag, not a traceback
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    args.overwrite = True
    assert args.func(args) == 0


def _tiny_clip_config(heads: int = 2, eos_token_id: int = VOCAB - 1) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=heads,
            hidden_act="gelu",
            bos_token_id=VOCAB - 2,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=heads * 2 if heads > 1 else 1,
            image_size=48,
            patch_size=16,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )


def _transformers_reference(config: CLIPConfig) -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.logit_scale = nn.Parameter(torch.tensor(2.9))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval()


def _assert_transformers_parity(reference: CLIPModel, model: HfClipModel) -> None:
    images, texts = _images(48), _texts()
    with torch.no_grad():
        expected = reference(input_ids=texts, pixel_values=images)
        actual = model(input_ids=texts, pixel_values=images)
        _assert_close(
            model.get_image_features(images), reference.get_image_features(images).pooler_output, "image"
        )
        _assert_close(
            model.get_text_features(texts), reference.get_text_features(texts).pooler_output, "text"
        )
    _assert_close(actual.logits_per_image, expected.logits_per_image, "logits")
    _assert_close(actual.text_embeds, expected.text_embeds, "text embeds")


@pytest.mark.parametrize("eos_token_id", [VOCAB - 1, 2], ids=["eos", "legacy-eos-2"])
def test_transformers_round_trip(tmp_path, eos_token_id):
    reference = _transformers_reference(_tiny_clip_config(eos_token_id=eos_token_id))
    reference.save_pretrained(tmp_path / "transformers")
    hf_dir = convert_checkpoint(tmp_path / "transformers", tmp_path / "hf_clip", processor=False)
    model = HfClipModel.from_pretrained(hf_dir).eval()
    assert (
        model.config.text_config.num_attention_heads == 2
        and model.config.vision_config.num_attention_heads == 4
    )
    assert (model.config.text_config.hidden_act, model.config.vision_config.hidden_act) == (
        "gelu",
        "quick_gelu",
    )
    _assert_transformers_parity(reference, model)

    back = convert_checkpoint(hf_dir, tmp_path / "back", to="transformers", processor=False)
    restored = CLIPModel.from_pretrained(back).eval()
    original = reference.state_dict()
    assert sorted(restored.state_dict()) == sorted(original)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        images, texts = _images(48), _texts()
        torch.testing.assert_close(
            restored(input_ids=texts, pixel_values=images).logits_per_image,
            model(input_ids=texts, pixel_values=images).logits_per_image,
            rtol=REL_TOL,
            atol=0,
        )


def test_attention_weights_equal_transformers_eager(tmp_path):
    """`output_attentions=True` gives transformers' CLIPModel's weights (eager, the one implementation where
    it forms them), layer by layer, for both towers; hf_clip's model stays on its default SDPA."""
    reference = _transformers_reference(_tiny_clip_config())
    reference.save_pretrained(tmp_path / "transformers")
    model = HfClipModel.from_pretrained(
        convert_checkpoint(tmp_path / "transformers", tmp_path / "hf_clip", processor=False)
    ).eval()
    reference.set_attn_implementation("eager")
    images, texts = _images(48), _texts()
    with torch.no_grad():
        expected = reference(input_ids=texts, pixel_values=images, output_attentions=True)
        actual = model(input_ids=texts, pixel_values=images, output_attentions=True)
    for tower in ("text_model_output", "vision_model_output"):
        assert len(actual[tower].attentions) == len(expected[tower].attentions) == 2
        for i, (a, b) in enumerate(zip(actual[tower].attentions, expected[tower].attentions)):
            _assert_close(a, b, f"{tower} attentions, layer {i}")


def test_bare_transformers_weights_file(tmp_path):
    # Without config.json, heads (width / 64) and activation (QuickGELU) follow CLIP's conventions.
    config = _tiny_clip_config(heads=1)
    config.text_config.hidden_act = "quick_gelu"
    reference = _transformers_reference(config)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "clip.safetensors")
    model = HfClipModel.from_pretrained(
        convert_checkpoint(tmp_path / "clip.safetensors", tmp_path / "out", processor=False)
    )
    _assert_transformers_parity(reference, model.eval())


def test_open_clip_to_transformers_with_processor(tmp_path):
    """OpenAI layout straight to a transformers directory whose tokenizer matches open_clip's."""
    cfg = _shrunk_config("ViT-B-16-quickgelu")
    cfg["text_cfg"]["vocab_size"] = 49408  # the real vocabulary, so the BPE processor applies
    reference = _reference(cfg)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    out = convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", to="transformers")
    model = CLIPModel.from_pretrained(out).eval()
    size = cfg["vision_cfg"]["image_size"]
    images, texts = _images(size), _texts(vocab=49408)
    with torch.no_grad():
        expected = reference.encode_image(images), reference.encode_text(texts)
        actual = model.get_image_features(images).pooler_output, model.get_text_features(texts).pooler_output
    _assert_close(actual[0], expected[0], "image features")
    _assert_close(actual[1], expected[1], "text features")

    processor = CLIPProcessor.from_pretrained(out)
    # transformers' tokenizer skips OpenAI's ftfy / HTML clean-up, so the captions here need none.
    captions = CAPTIONS[:2] + ["naïve café, 42 km"]
    ids = processor.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    reference_ids = open_clip.get_tokenizer("ViT-B-16")(captions)
    for row, ref_row in zip(ids, reference_ids):
        end = int((ref_row == 49407).nonzero()[0]) + 1
        assert row[:end].tolist() == ref_row[:end].tolist()
    assert processor.image_processor.crop_size == {"height": size, "width": size}
    pixels = processor(
        images=[torch.zeros(3, 100, 80, dtype=torch.uint8).numpy().transpose(1, 2, 0)], return_tensors="pt"
    )
    assert pixels.pixel_values.shape == (1, 3, size, size)


def _photo(width: int = 120, height: int = 90) -> Image.Image:
    grid = torch.arange(width * height * 3, dtype=torch.int64).reshape(height, width, 3)
    return Image.fromarray(((grid * 37) % 251).to(torch.uint8).numpy())


def test_converted_directory_is_complete(tmp_path):
    """OpenAI archive -> hf_clip directory whose processor reproduces open_clip's preprocessing end to end."""
    cfg = _shrunk_config("RN50x4-quickgelu")
    cfg["text_cfg"]["vocab_size"] = 49408  # the real vocabulary, so the BPE processor applies
    reference = _reference(cfg)
    _save_torchscript(reference, tmp_path / "RN50x4.pt", cfg)
    out = convert_checkpoint(tmp_path / "RN50x4.pt", tmp_path / "out")
    model = HfClipModel.from_pretrained(out).eval()
    processor = HfClipProcessor(
        image_processor=HfClipImageProcessor.from_pretrained(out),
        tokenizer=HfClipTokenizer.from_pretrained(out),
    )
    size = cfg["vision_cfg"]["image_size"]
    inputs = processor(
        text=CAPTIONS,
        images=[_photo()] * 3,
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    )
    reference_ids = open_clip.get_tokenizer("RN50x4")(CAPTIONS)
    assert torch.equal(inputs.input_ids, reference_ids)
    reference_pixels = (
        open_clip.image_transform(size, is_train=False)(_photo()).unsqueeze(0).expand(3, -1, -1, -1)
    )
    assert torch.equal(inputs.pixel_values, reference_pixels)
    with torch.no_grad():
        out_hf = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values)
        image, text = reference.encode_image(reference_pixels), reference.encode_text(reference_ids)
    expected = reference.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    _assert_close(out_hf.logits_per_image, expected, "logits")


def test_resnet_cannot_become_transformers(tmp_path):
    torch.save(_reference(_shrunk_config("RN50-quickgelu")).state_dict(), tmp_path / "rn.pt")
    # Refused first: the processor check (this vocabulary is not OpenAI's) used to answer, and only after
    # --no-processor did the real reason come.
    with pytest.raises(ConversionError, match="no ResNet image tower"):
        convert_checkpoint(tmp_path / "rn.pt", tmp_path / "out", to="transformers")
    assert not (tmp_path / "out").exists()


def test_resnet_without_batch_counters(tmp_path):
    # Some exports drop BatchNorm's num_batches_tracked; it is unused in eval mode and restored as 0.
    cfg = _shrunk_config("RN50-quickgelu")
    reference = _reference(cfg)
    state_dict = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state_dict, tmp_path / "rn.pt")
    model = HfClipModel.from_pretrained(
        convert_checkpoint(tmp_path / "rn.pt", tmp_path / "out", processor=False)
    )
    assert int(model.vision_model.bn1.num_batches_tracked) == 0
    _assert_parity(reference, model.eval(), cfg["vision_cfg"]["image_size"])


@pytest.fixture(scope="module")
def vit_state_dict():
    return _reference(_shrunk_config("ViT-B-32-quickgelu")).state_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop("transformer.resblocks.1.ln_2.bias"),
            r"missing tensors: transformer\.resblocks\.1\.ln_2\.bias",
        ),
        (lambda sd: sd.update(extra_head=torch.zeros(3)), "unexpected tensors: extra_head"),
        (
            lambda sd: sd.update({"transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(7, 64)}),
            r"text_model\.encoder\.layers\.1\.mlp\.fc1\.weight \(7, 64\) != \(256, 64\)",
        ),
        (lambda sd: sd.update({"visual.positional_embedding": torch.zeros(6, 96)}), "not a square grid"),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("visual.")], "neither a ViT"),
    ],
    ids=["missing", "unexpected", "mis-shaped", "bad-grid", "no-image-tower"],
)
def test_bad_checkpoints_name_the_problem(tmp_path, vit_state_dict, edit, message):
    state_dict = dict(vit_state_dict)
    edit(state_dict)
    torch.save(state_dict, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out", processor=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_inputs(tmp_path, vit_state_dict):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="Unrecognised checkpoint layout"):
        convert_checkpoint(tmp_path / "other.pt", tmp_path / "out")
    torch.save(vit_state_dict, tmp_path / "small_vocab.pt")
    with pytest.raises(ValueError, match="processor=False"):
        convert_checkpoint(tmp_path / "small_vocab.pt", tmp_path / "out")
    hf_dir = convert_checkpoint(tmp_path / "small_vocab.pt", tmp_path / "hf", processor=False)
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "hf_clip.safetensors")
    with pytest.raises(ConversionError, match="pass its model directory"):
        convert_checkpoint(tmp_path / "hf_clip.safetensors", tmp_path / "out")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="'bert' model"):
        convert_checkpoint(tmp_path / "bert", tmp_path / "out")
    with pytest.raises(ValueError, match="to='onnx'"):
        convert_checkpoint(tmp_path / "small_vocab.pt", tmp_path / "out", to="onnx")


def test_head_counts_from_a_given_config(tmp_path):
    """LAION's ViT-H/g/bigG use 80-104-wide heads: shapes alone cannot tell, so the architecture is named."""
    from hf_clip import HfClipConfig

    cfg = _shrunk_config("ViT-B-32-quickgelu")
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "width": 320, "head_width": 80}
    reference = _reference(cfg)
    torch.save(reference.state_dict(), tmp_path / "laion.pt")
    inferred = convert_checkpoint(tmp_path / "laion.pt", tmp_path / "guessed", processor=False)
    assert HfClipModel.from_pretrained(inferred).config.vision_config.num_attention_heads == 320 // 64 == 5
    vision = cfg["vision_cfg"]
    config = HfClipConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(
            vocab_size=cfg["text_cfg"]["vocab_size"],
            hidden_size=cfg["text_cfg"]["width"],
            num_hidden_layers=cfg["text_cfg"]["layers"],
            num_attention_heads=cfg["text_cfg"]["heads"],
            eos_token_id=VOCAB - 1,
            bos_token_id=VOCAB - 2,
        ),
        vision_config=dict(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_size=320,
            num_hidden_layers=vision["layers"],
            num_attention_heads=4,
        ),
    )
    config.to_json_file(tmp_path / "laion.json")
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "convert",
            str(tmp_path / "laion.pt"),
            str(tmp_path / "named"),
            "--config",
            str(tmp_path / "laion.json"),
            "--no-processor",
        ]
    )
    assert args.func(args) == 0
    model = HfClipModel.from_pretrained(tmp_path / "named").eval()
    assert model.config.vision_config.num_attention_heads == 4
    _assert_parity(reference, model, vision["image_size"])


@pytest.mark.parametrize(
    "name, preset_name",
    [
        ("ViT-H-14", "ViT-H-14"),
        ("ViT-bigG-14", "ViT-bigG-14"),
        ("ViT-B-32", "ViT-B-32"),
        ("ViT-H-14-378", "ViT-H-14"),  # another image size: the same heads
        ("ViT-H-16", "ViT-H-14"),  # another patch size: the same heads
    ],
)
def test_preset_sizes_take_the_presets_heads_and_activation(name, preset_name):
    """LAION's ViT-H/g/bigG heads are 80-104 wide, not CLIP's 64: with a preset's tower sizes (at any image
    or patch size), its heads are used (and its activation, unless one is given). Shapes only: the models are
    built on the meta device."""
    from hf_clip import HfClipConfig
    from hf_clip.convert import infer_openai_config

    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        state = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).state_dict()
    preset = HfClipConfig.from_preset(preset_name)
    inferred = infer_openai_config(state)
    for tower, ref in (
        (inferred.vision_config, preset.vision_config),
        (inferred.text_config, preset.text_config),
    ):
        assert tower.num_attention_heads == ref.num_attention_heads
        assert tower.hidden_act == ref.hidden_act == ("quick_gelu" if name == "ViT-B-32" else "gelu")
    given = infer_openai_config(state, "quick_gelu")
    assert given.vision_config.hidden_act == "quick_gelu"
    assert given.vision_config.num_attention_heads == preset.vision_config.num_attention_heads


def test_missing_bpe_vocabulary_is_reported_before_any_weights_are_written(tmp_path, monkeypatch):
    import hf_clip.convert.api as api
    from hf_clip.tokenization_hf_clip import OPENAI_BPE_FILENAME

    def missing() -> str:
        raise FileNotFoundError(f"{OPENAI_BPE_FILENAME} not found; pass --bpe-vocab PATH")

    monkeypatch.setattr(api, "_find_openai_bpe", missing)
    monkeypatch.setattr(api, "check_processor_vocabulary", lambda config: None)  # a small test vocabulary
    reference = _reference(_shrunk_config("ViT-B-32-quickgelu"))
    torch.save(reference.state_dict(), tmp_path / "b32.pt")
    built = []
    monkeypatch.setattr(api, "_build", lambda *args: built.append(args))
    with pytest.raises(FileNotFoundError, match="--bpe-vocab"):
        convert_checkpoint(tmp_path / "b32.pt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no/such/vocab.txt.gz"):  # a given path, too
        convert_checkpoint(tmp_path / "b32.pt", tmp_path / "out", bpe_vocab=tmp_path / "no/such/vocab.txt.gz")
    assert not built and not (tmp_path / "out").exists()


def test_legacy_end_of_text_with_added_tokens():
    """Legacy transformers configs (eos_token_id=2) pool at each caption's highest id: OpenAI's end-of-text
    token 49407, also when tokens were added after it (vocab 49410), not the last added token."""
    from hf_clip.convert.transformers import config_from_transformers

    for vocab, expected in ((49408, 49407), (49410, 49407), (VOCAB, VOCAB - 1)):
        config = CLIPConfig(text_config={"vocab_size": vocab, "eos_token_id": 2})
        assert config_from_transformers(config).text_config.eos_token_id == expected, vocab


def test_output_directory_modes_cwd_and_failed_overwrite(tmp_path, monkeypatch):
    """A new output directory gets the mode mkdir would give it; an existing one (possibly the working
    directory, ".") keeps its inode and mode; an overwrite that fails half-way puts the old files back."""
    import hf_clip.convert.api as api

    reference = _reference(_shrunk_config("ViT-B-32-quickgelu"))
    torch.save(reference.state_dict(), tmp_path / "b32.pt")
    umask = os.umask(0o022)
    try:
        new = convert_checkpoint(tmp_path / "b32.pt", tmp_path / "new", processor=False)
        assert new.stat().st_mode & 0o777 == 0o755
        here = tmp_path / "here"
        here.mkdir(mode=0o775)
        here.chmod(0o775)
        inode = here.stat().st_ino
        monkeypatch.chdir(here)
        assert convert_checkpoint(tmp_path / "b32.pt", ".", processor=False) == here
        assert here.stat().st_ino == inode and here.stat().st_mode & 0o777 == 0o775
        assert (here / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
            "b32.pt",
            "here",
            "new",
        ]
    finally:
        os.umask(umask)
    before = {p.name: p.read_bytes() for p in here.iterdir()}
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == len(before) + 2:  # the old files moved aside, then one new file moved in
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(api.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tmp_path / "b32.pt", here, processor=False, overwrite=True, activation="gelu")
    assert {p.name: p.read_bytes() for p in here.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b32.pt", "here", "new"]  # no leftovers


def test_logit_bias_model_to_transformers_is_refused_with_the_reason(tmp_path):
    from hf_clip import HfClipConfig

    config = HfClipConfig(
        projection_dim=16,
        logit_bias_init_value=-10.0,
        text_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            vocab_size=VOCAB,
            eos_token_id=VOCAB - 1,
            bos_token_id=VOCAB - 2,
        ),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1),
    )
    HfClipModel(config).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ConversionError, match="logit bias .* transformers' CLIPModel lacks"):
        convert_checkpoint(tmp_path / "siglip", tmp_path / "out", to="transformers", processor=False)


def test_config_option_is_refused_for_sources_with_their_own(tmp_path):
    reference = _transformers_reference(_tiny_clip_config())
    reference.save_pretrained(tmp_path / "transformers")
    with pytest.raises(ValueError, match="its own config.json"):
        convert_checkpoint(tmp_path / "transformers", tmp_path / "out", processor=False, config="RN50")
    assert not (tmp_path / "out").exists()


def test_open_clip_hub_folder_takes_its_config(tmp_path):
    """An open_clip Hub folder (open_clip_config.json + open_clip_model.safetensors) says what shapes cannot:
    exact GELU, 32-wide vision heads, 2 text heads; a variant hf_clip does not compute is refused."""
    cfg = _shrunk_config("ViT-B-32")
    cfg["vision_cfg"]["head_width"] = 32  # not width / 64
    cfg["text_cfg"]["heads"] = 2
    reference = _reference(cfg, quick_gelu=False)
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    model = HfClipModel.from_pretrained(convert_checkpoint(folder, tmp_path / "out", processor=False)).eval()
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.num_attention_heads, text.num_attention_heads) == (vision.hidden_size // 32, 2)
    assert vision.hidden_act == text.hidden_act == "gelu"
    _assert_parity(reference, model, cfg["vision_cfg"]["image_size"])
    # The weights file given directly finds the config beside it.
    beside = convert_checkpoint(folder / "open_clip_model.safetensors", tmp_path / "out2", processor=False)
    assert (
        HfClipModel.from_pretrained(beside).config.vision_config.num_attention_heads
        == vision.num_attention_heads
    )
    # Same tensor names, other computation: refused rather than converted wrong.
    for tower, option in (("text_cfg", {"pool_type": "last"}), ("vision_cfg", {"pool_type": "avg"})):
        variant = copy.deepcopy(cfg)
        variant[tower].update(option)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": variant}))
        with pytest.raises(ConversionError, match="pool_type"):
            convert_checkpoint(folder, tmp_path / "refused", processor=False)


@pytest.mark.parametrize("to", ["hf_clip", "transformers"])
def test_written_files_get_the_mode_open_would_give_them(tmp_path, to):
    """transformers writes the weights through a private temporary file: model.safetensors came out 0600 while
    every other file was 0644, so a converted model in a shared folder could not be loaded by anyone else."""
    reference = _reference(_shrunk_config("ViT-B-32-quickgelu"))
    torch.save(reference.state_dict(), tmp_path / "b32.pt")
    umask = os.umask(0o002)
    try:
        out = convert_checkpoint(tmp_path / "b32.pt", tmp_path / "out", to=to, processor=False)
    finally:
        os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o664}, modes


def test_overwrite_never_deletes_the_source(tmp_path, monkeypatch):
    """`hf-clip convert model.pt . --overwrite` replaced the folder's contents, deleting model.pt itself."""
    reference = _reference(_shrunk_config("ViT-B-32-quickgelu"))
    folder = tmp_path / "downloads"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "b32.pt")
    monkeypatch.chdir(folder)
    with pytest.raises(FileExistsError, match="inside the output directory"):
        convert_checkpoint("b32.pt", ".", processor=False, overwrite=True)
    hf_dir = convert_checkpoint("b32.pt", tmp_path / "hf", processor=False)
    with pytest.raises(FileExistsError, match="inside the output directory"):  # a model folder onto itself
        convert_checkpoint(hf_dir, hf_dir, to="transformers", processor=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["b32.pt"]
    assert (hf_dir / "model.safetensors").is_file()


def _hub_folder(folder, cfg: dict, reference: CLIP, preprocess_cfg: dict | None = None):
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg or {}})
    )
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    return folder


def test_open_clip_config_must_describe_the_weights(tmp_path):
    """A rectangular input (2 x 8 patches, plus one, looks like a 4 x 4 grid) converted without error at the
    wrong size, and an open_clip_config.json of another model beside the weights lent them its heads."""
    cfg = _shrunk_config("ViT-B-16-quickgelu")
    cfg["vision_cfg"]["image_size"] = [32, 128]
    folder = _hub_folder(tmp_path / "wide", cfg, _reference(cfg))
    with pytest.raises(ConversionError, match=r"image_size=\[32, 128\] is not square"):
        convert_checkpoint(folder, tmp_path / "out", processor=False)
    cfg = _shrunk_config("ViT-B-16-quickgelu")
    folder = _hub_folder(tmp_path / "other", cfg, _reference(cfg))
    other = {**cfg, "text_cfg": {**cfg["text_cfg"], "width": 2 * cfg["text_cfg"]["width"]}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": other}))
    with pytest.raises(ConversionError, match="does not describe these weights: text width=128"):
        convert_checkpoint(folder / "open_clip_model.safetensors", tmp_path / "out", processor=False)
    assert not (tmp_path / "out").exists()


def test_open_clip_config_sets_resnet_attention_pool_heads(tmp_path):
    """open_clip's ResNet attention pool has width * 32 // head_width heads; head_width was ignored."""
    cfg = _shrunk_config("RN50-quickgelu")
    cfg["vision_cfg"]["head_width"] = 32
    reference = _reference(cfg)
    folder = _hub_folder(tmp_path / "hub", {**cfg, "quick_gelu": True}, reference)
    model = HfClipModel.from_pretrained(convert_checkpoint(folder, tmp_path / "out", processor=False)).eval()
    assert model.config.vision_config.num_attention_heads == cfg["vision_cfg"]["width"] * 32 // 32
    _assert_parity(reference, model, cfg["vision_cfg"]["image_size"])


def test_open_clip_preprocessing_is_carried_into_the_processor(tmp_path):
    """open_clip Hub folders state their preprocessing (LAION's ViT-L/14 laion2b_s32b_b82k: mean = std = 0.5;
    DFN's ViT-H/14: "squash" resize); the converted processor used OpenAI's regardless."""
    from open_clip.push_to_hf_hub import save_config_for_hf

    cfg = _shrunk_config("ViT-B-16")
    cfg["text_cfg"]["vocab_size"] = 49408  # the real vocabulary, so the BPE processor applies
    reference = _reference(cfg, quick_gelu=False)
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    reference.visual.image_mean, reference.visual.image_std = preprocess["mean"], preprocess["std"]
    reference.visual.preprocess_cfg = preprocess
    folder = _hub_folder(tmp_path / "hub", cfg, reference)
    save_config_for_hf(reference, folder / "open_clip_config.json", cfg)  # open_clip's own writer
    size = cfg["vision_cfg"]["image_size"]
    expected = open_clip.image_transform(
        size,
        is_train=False,
        mean=preprocess["mean"],
        std=preprocess["std"],
        resize_mode="squash",
        interpolation="bilinear",
    )(_photo())
    out = convert_checkpoint(folder, tmp_path / "hf")
    pixels = HfClipImageProcessor.from_pretrained(out)(images=[_photo()], return_tensors="pt").pixel_values
    assert torch.equal(pixels[0], expected)
    out = convert_checkpoint(folder, tmp_path / "transformers", to="transformers")
    image_processor = CLIPProcessor.from_pretrained(out).image_processor
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5] * 3
    assert int(image_processor.resample) == 2 and not image_processor.do_center_crop
    assert (image_processor.size["height"], image_processor.size["width"]) == (size, size)
    # Resizing the long side and padding has no equivalent: refused before anything is written.
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"resize_mode": "longest"}})
    )
    with pytest.raises(ConversionError, match="resize_mode='longest'.*--no-processor"):
        convert_checkpoint(folder, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_model_folder_preprocessing_survives_conversion(tmp_path):
    """A transformers folder's saved image processor (LAION's mean = std = 0.5) was replaced by OpenAI's."""
    from transformers import CLIPImageProcessor

    config = _tiny_clip_config()
    config.text_config.vocab_size, config.text_config.eos_token_id = 49408, 49407
    config.text_config.bos_token_id = 49406
    _transformers_reference(config).save_pretrained(tmp_path / "transformers")
    CLIPImageProcessor(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2, size={"shortest_edge": 48}, crop_size=48
    ).save_pretrained(tmp_path / "transformers")
    hf_dir = convert_checkpoint(tmp_path / "transformers", tmp_path / "hf")
    image_processor = HfClipImageProcessor.from_pretrained(hf_dir)
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5] * 3
    assert int(image_processor.resample) == 2 and image_processor.crop_size["height"] == 48
    back = convert_checkpoint(hf_dir, tmp_path / "back", to="transformers")
    restored = CLIPProcessor.from_pretrained(back).image_processor
    assert list(restored.image_mean) == [0.5] * 3 and int(restored.resample) == 2


def test_config_option_takes_a_transformers_config(tmp_path):
    """A bare transformers weights file whose heads are not width / 64, named by its own config.json: read as
    an hf_clip config, the legacy eos_token_id=2 made the text tower pool at token 2."""
    reference = _transformers_reference(_tiny_clip_config(heads=2, eos_token_id=2))
    reference.save_pretrained(tmp_path / "transformers")
    weights = tmp_path / "transformers" / "model.safetensors"
    for config in (tmp_path / "transformers" / "config.json", tmp_path / "transformers"):
        out = convert_checkpoint(
            weights, tmp_path / "out", processor=False, config=str(config), overwrite=True
        )
        model = HfClipModel.from_pretrained(out).eval()
        assert model.config.text_config.num_attention_heads == 2
        _assert_transformers_parity(reference, model)
    with pytest.raises(FileNotFoundError, match=r"--config \(config=\): no config file at .*missing\.json"):
        convert_checkpoint(weights, tmp_path / "out2", processor=False, config=str(tmp_path / "missing.json"))


def test_config_preset_name_is_not_shadowed_by_a_folder_of_that_name(tmp_path, monkeypatch):
    """`hf-clip convert ViT-B-32/open_clip_model.safetensors out --config ViT-B-32` from a downloads folder: the
    folder named like the preset (without a config.json) was read as a config folder and refused."""
    from hf_clip import HfClipConfig
    from hf_clip.convert.api import _given_config

    (tmp_path / "ViT-B-32").mkdir()
    monkeypatch.chdir(tmp_path)
    expected = HfClipConfig.from_preset("ViT-B-32").to_dict()
    assert _given_config("ViT-B-32", activation="quick_gelu").to_dict() == expected
    # A folder with a config.json still stands for it; one without, under no preset's name, is refused.
    HfClipConfig.from_preset("RN50").save_pretrained(tmp_path / "ViT-B-32")
    assert _given_config("ViT-B-32").vision_config.vision_type == "resnet"
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileNotFoundError, match="no config file at mine/config.json"):
        _given_config("mine")


def test_legacy_preprocessor_config_with_an_integer_size(tmp_path):
    # Old transformers configs store `size` as an int; with do_center_crop false this raised a TypeError.
    from hf_clip.convert.processor import model_folder_image_settings

    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": 224, "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    assert model_folder_image_settings(tmp_path) == {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def _fake_hub(monkeypatch, repos: dict, calls: list) -> None:
    """huggingface_hub's listing and snapshot download served from local folders, recording each call."""
    import fnmatch as fn

    import huggingface_hub

    def list_repo_files(api, repo_id, revision=None, **kwargs):
        calls.append(("list", repo_id, revision))
        return sorted(
            p.relative_to(repos[repo_id]).as_posix() for p in repos[repo_id].rglob("*") if p.is_file()
        )

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append(("download", repo_id, revision, allow_patterns, local_files_only))
        out = repos[repo_id].parent / f"snapshot-{len(calls)}"
        for path in repos[repo_id].rglob("*"):
            name = path.relative_to(repos[repo_id]).as_posix()
            if path.is_file() and (
                allow_patterns is None or any(fn.fnmatch(name, p) for p in allow_patterns)
            ):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out / name)
        return str(out)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_repository_id_downloads_one_copy_and_converts(tmp_path, monkeypatch):
    """`hf-clip convert org/name OUT`: a LAION-style repository holding transformers and open_clip copies of the
    weights gets only the transformers safetensors copy downloaded (the open_clip file here is junk that would
    fail to load), and the result equals transformers' model."""
    reference = _transformers_reference(_tiny_clip_config())
    repo = tmp_path / "hub" / "laion-clip"
    reference.save_pretrained(repo)
    (repo / "open_clip_config.json").write_text("{}")
    (repo / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    calls: list = []
    _fake_hub(monkeypatch, {"laion/tiny-clip": repo}, calls)
    from hf_clip.cli import main

    assert (
        main(["convert", "laion/tiny-clip", str(tmp_path / "out"), "--no-processor", "--revision", "v1"]) == 0
    )
    assert calls[0] == ("list", "laion/tiny-clip", "v1")
    assert calls[1][3] == [
        "config.json",
        "model*.safetensors*",
        "preprocessor_config.json",
        "processor_config.json",
    ]
    _assert_transformers_parity(reference, HfClipModel.from_pretrained(tmp_path / "out").eval())


def test_hub_files_to_fetch_prefer_safetensors_and_name_what_is_missing(tmp_path, monkeypatch):
    from hf_clip.convert.download import files_to_fetch, resolve_source

    both = [
        "open_clip_config.json",
        "open_clip_pytorch_model.bin",
        "open_clip_model.safetensors",
        "README.md",
    ]
    assert files_to_fetch(both) == ["open_clip_config.json", "open_clip_model.safetensors"]
    pickled = ["config.json", "pytorch_model.bin", "open_clip_config.json", "open_clip_model.safetensors"]
    assert files_to_fetch(pickled) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert files_to_fetch(["config.json", "pytorch_model.bin"])[:2] == ["config.json", "pytorch_model*.bin*"]
    with pytest.raises(ConversionError, match="no checkpoint hf_clip converts.*README.md"):
        files_to_fetch(["README.md", "tf_model.h5"])
    # A missing local file is named as such, never looked up on the Hub.
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_source(tmp_path.name + "/missing.pt")
    # Offline (or the Hub unreachable): a snapshot already in the cache is used.
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    calls: list = []
    _fake_hub(monkeypatch, {"org/cached": tmp_path}, calls)

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    resolve_source("hf-hub:org/cached")
    assert calls == [("download", "org/cached", None, None, True)]


def test_a_model_folders_own_weights_file_converts_as_the_folder(tmp_path):
    # Given `folder/model.safetensors` rather than the folder, the config.json beside it was ignored: heads were
    # guessed as width / 64 (1 here, not 2) and the embeddings came out wrong.
    reference = _transformers_reference(_tiny_clip_config())
    reference.save_pretrained(tmp_path / "transformers")
    out = convert_checkpoint(
        tmp_path / "transformers" / "model.safetensors", tmp_path / "out", processor=False
    )
    model = HfClipModel.from_pretrained(out).eval()
    assert model.config.text_config.num_attention_heads == 2
    _assert_transformers_parity(reference, model)


# ---- --to open_clip: hf_clip models written as open_clip folders ------------------------------------------

OPENAI_VOCAB = 49408  # open_clip tokenizes with OpenAI's BPE, so only that vocabulary converts


def _hf_clip_model(
    kind: str, act: str, bias: float | None, seed: int = 0, vocab: int = OPENAI_VOCAB
) -> HfClipModel:
    """A tiny random hf_clip model with OpenAI's vocabulary, every weight (biases, norms, temperature) moved off
    its initial value so that a weight lost or misplaced on the way shows."""
    from hf_clip import HfClipConfig

    if kind == "vit":  # heads of width 16, not 64: head_width must travel
        vision = dict(
            image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        vision["intermediate_size"] = 96
    else:
        vision = dict(vision_type="resnet", resnet_layers=[1, 2, 1, 1], hidden_size=8, image_size=64)
        vision["num_attention_heads"] = 8
    config = HfClipConfig(
        projection_dim=24,
        logit_bias_init_value=bias,
        text_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act=act,
            vocab_size=vocab,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
        ),
        vision_config={**vision, "hidden_act": act},
    )
    torch.manual_seed(seed)
    model = _randomize(HfClipModel(config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.bias") or name.endswith("fc1.bias") or name.endswith("fc2.bias"):
                parameter.normal_(0, 0.1)
        if model.logit_bias is not None:
            model.logit_bias.fill_(-7.25)
    return model


def _hf_clip_folder(folder, model: HfClipModel, **image) -> HfClipModel:
    from hf_clip.convert.processor import save_processor_files

    model.save_pretrained(folder)
    save_processor_files(folder, model.config, image=image)
    return model


def _open_clip_from(folder):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess


@pytest.mark.parametrize(
    "kind, act, bias, eos",
    [
        ("vit", "quick_gelu", None, None),
        ("vit", "gelu", -10.0, None),
        ("resnet", "quick_gelu", -10.0, None),
        ("resnet", "gelu", None, None),
        ("vit", "gelu", None, OPENAI_VOCAB - 2),  # pooling at another id than the highest: pool_type 'eos'
    ],
)
def test_hf_clip_to_open_clip_parity_and_round_trip(tmp_path, kind, act, bias, eos):
    """open_clip's local-dir loader builds the same model: embeddings within 1e-5, equal temperature and
    bias, logits; converted back, the hf_clip folder has the same weights and config."""
    model = _hf_clip_model(kind, act, bias)
    if eos is not None:
        model.config.text_config.eos_token_id = eos
    _hf_clip_folder(tmp_path / "hf", model)
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", str(tmp_path / "hf"), str(tmp_path / "oc"), "--to", "open_clip"])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "oc").iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    reference, _ = _open_clip_from(tmp_path / "oc")
    model_cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg["quick_gelu"] == (act == "quick_gelu")
    pooling = {"pool_type": "eos", "eos_id": eos} if eos is not None else {}
    assert {
        k: model_cfg["text_cfg"][k] for k in ("pool_type", "eos_id") if k in model_cfg["text_cfg"]
    } == pooling
    assert torch.equal(reference.logit_scale.detach(), model.logit_scale.detach())
    if bias is None:
        assert reference.logit_bias is None
    else:
        assert torch.equal(reference.logit_bias.detach(), model.logit_bias.detach())
    expected = _Expected(reference, model.config.vision_config.image_size, vocab=OPENAI_VOCAB)
    if bias is not None:  # open_clip's CLIP adds its bias to the logits, as hf_clip does
        expected.logits = expected.logits + reference.logit_bias.detach()
    expected.check(model)

    back = convert_checkpoint(tmp_path / "oc", tmp_path / "back")
    restored = HfClipModel.from_pretrained(back)
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    assert all(torch.equal(state[k], restored_state[k]) for k in state)
    ignored = ("_name_or_path", "dtype")
    config, restored_config = model.config.to_dict(), restored.config.to_dict()
    for entry in (config, restored_config, config["text_config"], config["vision_config"]):
        for key in ignored:
            entry.pop(key, None)
    for entry in (restored_config["text_config"], restored_config["vision_config"]):
        for key in ignored:
            entry.pop(key, None)
    assert restored_config == config


def test_open_clip_folder_tokenizer_and_preprocessing_match_hf_clip(tmp_path):
    """open_clip's tokenizer for the folder gives hf_clip's ids; its transform, built from the image processor
    (here LAION's mean = std = 0.5, bilinear, "squash"), gives the same pixels, bit for bit: both resize with
    PIL's filter and crop with torchvision's rounding (see image_processing_hf_clip), so the tolerance is 0."""
    model = _hf_clip_model("vit", "gelu", None)
    for name, image in (
        ("openai", {}),
        ("laion", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2, "squash": True}),
    ):
        _hf_clip_folder(tmp_path / name, model, **image)
        out = convert_checkpoint(tmp_path / name, tmp_path / f"oc-{name}", to="open_clip")
        _, preprocess = _open_clip_from(out)
        image_processor = HfClipImageProcessor.from_pretrained(tmp_path / name)
        generator = torch.Generator().manual_seed(3)
        for height, width in ((90, 120), (200, 64), (47, 33)):
            photo = Image.fromarray(
                torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
            )
            pixels = image_processor(images=[photo], return_tensors="pt").pixel_values[0]
            assert torch.equal(preprocess(photo), pixels), (name, height, width)
    ids = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    tokenizer = HfClipTokenizer.from_pretrained(tmp_path / "openai")
    expected = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids)


def test_open_clip_and_transformers_sources_to_open_clip(tmp_path):
    """Any source the converter reads: an open_clip state dict (GELU, from its own config), a transformers
    folder whose tokenizer spells the special tokens its way."""
    cfg = _shrunk_config("ViT-B-16")
    cfg["text_cfg"]["vocab_size"] = OPENAI_VOCAB
    reference = _reference(cfg, quick_gelu=False)
    folder = _hub_folder(tmp_path / "hub", cfg, reference, {"mean": [0.5] * 3, "std": [0.5] * 3})
    out = convert_checkpoint(folder, tmp_path / "oc", to="open_clip")
    written = json.loads((out / "open_clip_config.json").read_text())
    assert written["preprocess_cfg"]["mean"] == [0.5] * 3 and not written["model_cfg"]["quick_gelu"]
    loaded, _ = _open_clip_from(out)
    expected = _Expected(reference, cfg["vision_cfg"]["image_size"], vocab=OPENAI_VOCAB)
    with torch.no_grad():
        _assert_close(loaded.encode_image(expected.images), expected.image, "image features")
        _assert_close(loaded.encode_text(expected.texts), expected.text, "text features")

    config = _tiny_clip_config()
    config.text_config.vocab_size, config.text_config.eos_token_id = OPENAI_VOCAB, OPENAI_VOCAB - 1
    config.text_config.bos_token_id = OPENAI_VOCAB - 2
    config.vision_config.hidden_act = "gelu"
    transformers_model = _transformers_reference(config)
    hf_dir = convert_checkpoint(_saved(transformers_model, tmp_path / "transformers"), tmp_path / "hf")
    convert_checkpoint(hf_dir, tmp_path / "t", to="transformers")  # with transformers' own tokenizer.json
    out = convert_checkpoint(tmp_path / "t", tmp_path / "oc-t", to="open_clip")
    loaded, _ = _open_clip_from(out)
    images, texts = _images(48), _texts(vocab=OPENAI_VOCAB)
    with torch.no_grad():
        _assert_close(
            loaded.encode_text(texts), transformers_model.get_text_features(texts).pooler_output, "text"
        )
        _assert_close(
            loaded.encode_image(images), transformers_model.get_image_features(images).pooler_output, "image"
        )


def _saved(model: nn.Module, folder):
    model.save_pretrained(folder)
    return folder


def test_what_open_clip_cannot_load_is_refused_before_writing(tmp_path):
    from hf_clip import HfClipForImageClassification

    model = _hf_clip_folder(tmp_path / "hf", _hf_clip_model("vit", "gelu", None))
    refused = tmp_path / "refused"
    # A classifier folder has no text tower.
    HfClipForImageClassification(model.config).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="image classifier"):
        convert_checkpoint(tmp_path / "classifier", refused, to="open_clip")
    # A tokenizer that is not OpenAI's, at OpenAI's size or at pretrain.py's.
    tokenizer = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a</w>"], vocab["the</w>"] = vocab["the</w>"], vocab["a</w>"]
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConversionError, match="tokenizer.json\\) is not OpenAI's BPE vocabulary"):
        convert_checkpoint(tmp_path / "hf", refused, to="open_clip")
    small = _hf_clip_model("vit", "gelu", None, vocab=600)
    trained = HfClipTokenizer().train_new_from_iterator(CAPTIONS * 10, vocab_size=600)
    small.save_pretrained(tmp_path / "small")
    trained.save_pretrained(tmp_path / "small")
    with pytest.raises(ConversionError, match="600 tokens, not OpenAI BPE's 49,408"):
        convert_checkpoint(tmp_path / "small", refused, to="open_clip", processor=False)
    # One activation for both ViT towers.
    mixed = _hf_clip_model("vit", "gelu", None)
    mixed.config.vision_config.hidden_act = "quick_gelu"
    _hf_clip_folder(tmp_path / "mixed", mixed)
    with pytest.raises(ConversionError, match="quick_gelu sets both"):
        convert_checkpoint(tmp_path / "mixed", refused, to="open_clip")
    # Resize 2x then crop: open_clip resizes to the input size; processor=False writes its defaults.
    _hf_clip_folder(tmp_path / "crop", model)
    HfClipImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "crop"
    )
    with pytest.raises(ConversionError, match="resizes to 64 px, not the model's 32.*--no-processor"):
        convert_checkpoint(tmp_path / "crop", refused, to="open_clip")
    assert not refused.exists()
    out = convert_checkpoint(tmp_path / "crop", refused, to="open_clip", processor=False)
    assert json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"] == {}
