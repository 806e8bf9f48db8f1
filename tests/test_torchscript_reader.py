"""The TorchScript reader returns exactly the archive's state dict and never runs anything from it."""

import io
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hf_clip.convert.loading import load_state_dict_file
from hf_clip.convert.torchscript import (
    UnsafeCheckpointError,
    is_torchscript_archive,
    read_torchscript_state_dict,
)

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")


def _tiny_clip(vision: str) -> CLIP:
    torch.manual_seed(0)
    if vision == "resnet":
        vision_cfg = CLIPVisionCfg(layers=(1, 2, 1, 1), width=8, image_size=64, patch_size=None)
    else:
        vision_cfg = CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=32)
    text_cfg = CLIPTextCfg(context_length=77, vocab_size=300, width=64, heads=1, layers=2)
    model = CLIP(32, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that buffers are checked too
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model


def _trace(model: CLIP, path) -> None:
    """Trace forward / encode_image / encode_text as OpenAI's released archives were, and save."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    image, text = torch.randn(2, 3, size, size), torch.randint(0, 300, (2, 77))
    traced = torch.jit.trace_module(
        model, {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)}, check_trace=False
    )
    torch.jit.save(traced, str(path))


def _assert_same(state_dict: dict, reference: dict, ordered: bool = True) -> None:
    assert list(state_dict) == list(reference) if ordered else sorted(state_dict) == sorted(reference)
    for name, tensor in reference.items():
        assert state_dict[name].dtype == tensor.dtype, name
        assert state_dict[name].shape == tensor.shape, name
        assert torch.equal(state_dict[name], tensor), name


def _assert_matches_module(state_dict: dict, model: nn.Module) -> None:
    """TorchScript keeps non-persistent buffers (open_clip's attn_mask) in its state dict; all else is equal."""
    reference = model.state_dict()
    extra = set(state_dict) - set(reference)
    assert extra == {"attn_mask"}
    assert torch.equal(state_dict["attn_mask"], model.attn_mask)
    _assert_same({k: v for k, v in state_dict.items() if k in reference}, reference)


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_traced_archive_matches_jit_load_and_module(tmp_path, vision):
    model = _tiny_clip(vision)
    path = tmp_path / "model.pt"
    _trace(model, path)
    assert is_torchscript_archive(path)
    state_dict = read_torchscript_state_dict(path)
    _assert_same(state_dict, torch.jit.load(str(path)).state_dict())
    _assert_matches_module(state_dict, model)
    assert any(name.endswith("running_mean") for name in state_dict) == (vision == "resnet")


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_scripted_half_precision_archive(tmp_path, vision):
    # OpenAI's archives store most weights as float16 and LayerNorm/BatchNorm in float32.
    model = _tiny_clip(vision)
    convert_weights_to_lp(model, torch.float16)
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    state_dict = read_torchscript_state_dict(path)
    assert {tensor.dtype for tensor in state_dict.values()} >= {torch.float16, torch.float32}
    _assert_same(state_dict, torch.jit.load(str(path)).state_dict())
    _assert_matches_module(state_dict, model)


class _SharedStorage(nn.Module):
    """Parameters and buffers that are strided views into one storage, plus an optional None parameter."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
        self.weight = nn.Parameter(base)
        self.register_buffer("view", base[2:, 1::3])
        self.register_buffer("transposed", base.t())
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))
        self.register_buffer("flags", torch.tensor([True, False]))
        self.register_parameter("bias", None)
        self.child = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(x) + self.view.sum() + self.transposed.sum()


def test_shared_and_strided_storages(tmp_path):
    module = _SharedStorage()
    path = tmp_path / "shared.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    state_dict = read_torchscript_state_dict(path)
    _assert_same(state_dict, module.state_dict())
    assert (
        state_dict["view"].untyped_storage().data_ptr() == state_dict["weight"].untyped_storage().data_ptr()
    )
    assert state_dict["transposed"].stride() == (1, 10)


def _rewrite(path, out, transform) -> None:
    """Copy a zip, passing each (name, bytes) through `transform`."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = transform(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)


def test_archive_without_code_declarations(tmp_path):
    # If a class's code cannot be matched, every tensor attribute of the module is taken as state.
    model = _tiny_clip("resnet")
    path, stripped = tmp_path / "model.pt", tmp_path / "stripped.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    _rewrite(path, stripped, lambda name, data: None if "/code/" in name else data)
    _assert_matches_module(read_torchscript_state_dict(stripped), model)


def test_big_endian_archive(tmp_path):
    module = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    path, swapped = tmp_path / "little.pt", tmp_path / "big.pt"
    torch.jit.save(torch.jit.script(module), str(path))

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:  # every tensor here is float32
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 4).flip(-1).numpy().tobytes()
        return data

    _rewrite(path, swapped, to_big_endian)
    _assert_same(read_torchscript_state_dict(swapped), module.state_dict())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _malicious_archive(tmp_path, payload: bytes):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__/m.py", "class M(Module):\n  __parameters__ = []\n")
        archive.writestr("evil/version", "3")
    return path


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(_Evil(), protocol=2),
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"ctorch\nload\n(S'x'\ntR.",
        b"c__builtin__\nexec\n(S'x=1'\ntR.",
    ],
    ids=["os.system", "builtins.eval", "torch.load", "exec"],
)
def test_malicious_globals_are_refused(tmp_path, monkeypatch, payload):
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    path = _malicious_archive(tmp_path, payload)
    assert is_torchscript_archive(path)
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load the global"):
        read_torchscript_state_dict(path)
    with pytest.raises(ValueError, match="not loaded for safety") as refused:  # one line on the CLI
        load_state_dict_file(path)
    assert isinstance(refused.value.__cause__, UnsafeCheckpointError)
    assert calls == []


def test_malicious_pickle_inside_a_real_archive(tmp_path, monkeypatch):
    path, evil = tmp_path / "ok.pt", tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    payload = pickle.dumps(_Evil(), protocol=2)
    _rewrite(path, evil, lambda name, data: payload if name.endswith("/data.pkl") else data)
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
        read_torchscript_state_dict(evil)
    assert calls == []


def test_truncated_storage_is_an_error(tmp_path):
    path, broken = tmp_path / "ok.pt", tmp_path / "broken.pt"
    torch.jit.save(torch.jit.script(nn.Linear(4, 4)), str(path))
    _rewrite(path, broken, lambda name, data: data[:-4] if "/data/" in name else data)
    with pytest.raises(UnsafeCheckpointError, match="bytes, expected"):
        read_torchscript_state_dict(broken)


def test_plain_checkpoints_are_loaded_with_weights_only(tmp_path):
    model = _tiny_clip("vit")
    reference = model.state_dict()
    plain, wrapped, tensors = tmp_path / "plain.pt", tmp_path / "wrapped.pt", tmp_path / "model.safetensors"
    torch.save(reference, plain)
    # open_clip training checkpoints: {"epoch", "name", "state_dict": {"module." + name: tensor}, ...}
    torch.save(
        {"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in reference.items()}}, wrapped
    )
    save_file({k: v.contiguous() for k, v in reference.items()}, tensors)
    assert not is_torchscript_archive(plain)
    for path in (plain, wrapped):
        _assert_same(load_state_dict_file(path), reference)
    _assert_same(load_state_dict_file(tensors), reference, ordered=False)  # safetensors sorts its keys
    renamed = tensors.rename(tmp_path / "model.bin")  # recognised by content, not by name
    _assert_same(load_state_dict_file(renamed), reference, ordered=False)


def test_pickled_objects_are_refused_in_plain_checkpoints(tmp_path):
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "obj": _Evil()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not loaded for safety"):
        load_state_dict_file(path)


def test_truncated_or_empty_files_are_a_clear_error(tmp_path):
    reference = {k: v.contiguous() for k, v in _tiny_clip("vit").state_dict().items()}
    good_tensors, good_pickle = tmp_path / "good.safetensors", tmp_path / "good.pt"
    save_file(reference, good_tensors)
    torch.save(reference, good_pickle)
    for good in (good_tensors, good_pickle):
        data = good.read_bytes()
        broken = tmp_path / f"truncated{good.suffix}"
        broken.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_state_dict_file(broken)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict_file(tmp_path / "empty.pt")


def test_refusals_name_the_cause_and_never_advise_unsafe_loading(tmp_path):
    """torch's weights-only error opens with advice to retry with weights_only=False (which runs the file's
    code) and names the refused global only later: the one-line message keeps the cause, drops the advice."""
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "obj": _Evil()}, path)
    with pytest.raises(ValueError, match="not loaded for safety") as refused:
        load_state_dict_file(path)
    message = str(refused.value)
    assert "system" in message  # the refused global (posix.system / os.system)
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')  # not a checkpoint at all
    with pytest.raises(ValueError, match="is not a checkpoint") as not_one:
        load_state_dict_file(tmp_path / "config.json")
    assert "weights_only" not in str(not_one.value)
