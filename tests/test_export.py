"""The towers under the tools users deploy them with: graph export and quantisation."""

import pytest
import torch
from test_modeling import EOS, ids_batch, pixels, tiny_config

from hf_clip import HfClipModel


def ids_of(lengths: tuple[int, ...], total: int = 77) -> torch.Tensor:
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = 49406
        ids[row, 1 : n + 1] = torch.arange(100, 100 + n)
        ids[row, n + 1] = EOS
    return ids


class _ImageFeatures(torch.nn.Module):
    def __init__(self, model: HfClipModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values)


class _TextFeatures(torch.nn.Module):
    def __init__(self, model: HfClipModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids)


@pytest.mark.filterwarnings("ignore")
def test_exported_text_tower_pools_captions_of_other_lengths():
    """Captions are trimmed at run time except while tracing: the exported graph runs every position and
    must still pool each caption at its own end-of-text token, whatever the batch, padding or lengths."""
    model = HfClipModel(tiny_config()).eval()
    wrapper = _TextFeatures(model).eval()
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=77)}
    exported = torch.export.export(wrapper, (ids_batch(),), dynamic_shapes=(dims,)).module()
    for ids in (ids_of((40, 1)), ids_of((70, 5, 2, 60)), ids_batch()[:, :12], ids_of((3, 30))[:, :32]):
        with torch.no_grad():
            torch.testing.assert_close(exported(ids), model.get_text_features(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_torchscript_onnx_export_of_the_vit_keeps_the_batch_dynamic(tmp_path):
    """The TorchScript ONNX exporter typed `unflatten`'s output with the example's batch size and folded it
    into the class token's expand: the exported ViT failed at any other batch size."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    cfg = tiny_config("vit")
    model = HfClipModel(cfg).eval()
    path = str(tmp_path / "image.onnx")
    torch.onnx.export(
        _ImageFeatures(model).eval(),
        (pixels(cfg, 3),),
        path,
        input_names=["pixel_values"],
        dynamic_axes={"pixel_values": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (3, 2, 5):
        px = pixels(cfg, n)
        (got,) = session.run(None, {"pixel_values": px.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(
                torch.from_numpy(got), model.get_image_features(px), rtol=1e-5, atol=1e-5
            )


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_dynamic_quantisation_reaches_every_linear_layer(vision_type):
    """torch.ao matches layer types exactly: on hf_clip's own layers `quantize_dynamic` quantised nothing,
    silently. After `plain_torch_layers` (which changes no number) it quantises every linear layer."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch import nn

    from hf_clip import plain_torch_layers
    from hf_clip.modeling_hf_clip import HfClipLinear

    torch.manual_seed(0)
    cfg = tiny_config(vision_type)
    model = HfClipModel(cfg).eval()
    names = [name for name, m in model.named_modules() if isinstance(m, HfClipLinear)]
    ids, px = ids_batch(), pixels(cfg)
    with torch.no_grad():
        text, image = model.get_text_features(ids), model.get_image_features(px)
        keys = list(model.state_dict())
        assert plain_torch_layers(model) is model
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model.get_text_features(ids), text, rtol=0, atol=0)
        torch.testing.assert_close(model.get_image_features(px), image, rtol=0, atol=0)
        quantised = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        modules = dict(quantised.named_modules())
        assert all(isinstance(modules[name], nnqd.Linear) for name in names)
        for got, ref in ((quantised.get_text_features(ids), text), (quantised.get_image_features(px), image)):
            assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.99
