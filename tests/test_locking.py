"""Locked-tower training (LiT): parameter groups as open_clip's, no autograd through a fully locked tower,
GradCache, frozen BatchNorm statistics, and the pretraining script's --lock_* options end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import TINY_MODEL, TWO_CPU_PROCESSES, _launch, logged_losses, tiny_args

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.training import (
    ClipLoss,
    PretrainArguments,
    contrastive_accumulation_step,
    create_optimizer,
    run_pretraining,
)
from hf_clip.training.locking import (
    count_parameters,
    image_tower_groups,
    lock_image_tower,
    lock_text_tower,
    text_tower_groups,
    tower_is_locked,
)
from hf_clip.training.pretraining import _check_lock_options

TWO_LAYERS = {
    **TINY_MODEL,
    "text_config": {
        **TINY_MODEL["text_config"],
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "eos_token_id": 99,
        "bos_token_id": 98,
    },
    "vision_config": {**TINY_MODEL["vision_config"], "num_hidden_layers": 2},
}
TINY_RESNET = {
    **TWO_LAYERS,
    "vision_config": {
        "vision_type": "resnet",
        "resnet_layers": [1, 1, 1, 1],
        "hidden_size": 16,
        "image_size": 64,
    },
}


def _model(config: dict = TWO_LAYERS, seed: int = 0) -> HfClipModel:
    torch.manual_seed(seed)
    return HfClipModel(HfClipConfig(**config))


def _inputs(batch: int = 4, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 98, (batch, 12), generator=generator)
    ids[:, -1] = 99  # the config's default end-of-text id is the vocabulary's last
    return ids, torch.randn(batch, 3, image_size, image_size, generator=generator)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_groups_are_open_clips(vision):
    """For every N, `--lock_image_unlocked_groups N` / `--lock_text_unlocked_layers N` leave the same weights
    trainable as open_clip's lock_image_tower / lock_text_tower (names mapped by the conversion rules)."""
    from open_clip.model import CLIP
    from open_clip.transformer import lock_text_tower as open_clip_lock_text

    from hf_clip.convert import infer_openai_config
    from hf_clip.convert.openai import openai_rules

    vision_cfg = (
        {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 8}
        if vision == "resnet"
        else {"layers": 3, "width": 32, "patch_size": 16, "image_size": 32, "head_width": 16}
    )
    text_cfg = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 3}
    reference = CLIP(32, vision_cfg, text_cfg)
    config = infer_openai_config(reference.state_dict())
    rules = openai_rules(config)
    model = HfClipModel(config)

    def mapped(trainable: set[str]) -> set[str]:
        return {
            r.target
            for r in rules
            if set(r.sources) <= trainable and r.target in dict(model.named_parameters())
        }

    image_groups = len(image_tower_groups(model))
    assert image_groups == (6 if vision == "resnet" else 3 + 2)
    # open_clip's ResNet locks only whole (its partial locking asserts).
    for unlocked in [0] if vision == "resnet" else range(image_groups):
        for p in reference.parameters():
            p.requires_grad_(True)
        reference.lock_image_tower(unlocked_groups=unlocked)
        lock_image_tower(model, unlocked)
        assert _trainable(model) == mapped(_trainable(reference)), unlocked
        assert "logit_scale" in _trainable(model)
    model.requires_grad_(True)
    assert len(text_tower_groups(model)) == 3 + 2
    for unlocked in range(5):
        for p in reference.parameters():
            p.requires_grad_(True)
        open_clip_lock_text(reference, unlocked)
        lock_text_tower(model, unlocked, freeze_layer_norm=True)
        assert _trainable(model) == mapped(_trainable(reference)), unlocked


def test_the_optimizer_gets_only_trainable_parameters():
    model = _model()
    lock = lock_image_tower(model)
    assert lock.fully_locked and tower_is_locked(model, "image") and not tower_is_locked(model, "text")
    optimizer = create_optimizer(model, lr=1e-3)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_optimizer}
    assert names == _trainable(model)
    assert not any(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    assert "logit_scale" in names and "text_projection.weight" in names
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names) < total


def _saved_tensors(fn) -> int:
    """How many tensors autograd keeps for backward while `fn` runs."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return count


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_fully_locked_tower_builds_no_graph(tower):
    """Even with gradient checkpointing, whose hook makes every tower's input embeddings output require grad
    (a graph through every locked layer), the locked tower keeps nothing for backward."""
    model = _model().train()
    model.gradient_checkpointing_enable()
    ids, pixels = _inputs()
    if tower == "image":
        lock_image_tower(model)
    else:
        lock_text_tower(model)
    locked = (
        (lambda: model.get_image_features(pixels))
        if tower == "image"
        else (lambda: model.get_text_features(ids))
    )
    assert _saved_tensors(locked) == 0
    assert not locked().requires_grad and torch.is_grad_enabled()
    out = model(input_ids=ids, pixel_values=pixels)
    embeds = {"image": out.image_embeds, "text": out.text_embeds}
    assert not embeds[tower].requires_grad and embeds["text" if tower == "image" else "image"].requires_grad
    # Partly locked: the tower trains again (and keeps what its backward needs).
    (lock_image_tower if tower == "image" else lock_text_tower)(model, 1)
    assert locked().requires_grad and _saved_tensors(locked) > 0
    # The grad mode comes back after a forward that fails.
    lock_image_tower(model)
    with pytest.raises(ValueError):
        model.get_image_features(pixels[:, :2])
    assert torch.is_grad_enabled()


def test_text_layer_norms_train_unless_frozen():
    model = _model()
    lock = lock_text_tower(model, freeze_layer_norm=False)
    norms = {n for n in _trainable(model) if n.startswith("text_model.")}
    assert norms and all("layer_norm" in n for n in norms)
    assert not lock.fully_locked and not tower_is_locked(model, "text")
    assert lock_text_tower(model).fully_locked  # open_clip's lock_text_tower default


def test_frozen_batch_norm_statistics_survive_train():
    model = _model(TINY_RESNET)
    keys = list(model.state_dict())
    lock_image_tower(model, unlocked_groups=2, freeze_bn_stats=True)  # stage 4 and the attention pool train
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, pixels = _inputs(image_size=64)
    model(input_ids=ids, pixel_values=pixels).logits_per_image.sum().backward()
    after = model.state_dict()
    assert list(after) == keys  # the same state dict (saved and loaded as before)
    for name in keys:
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            frozen = not name.startswith("vision_model.layer4.")
            assert torch.equal(before[name], after[name]) == frozen, name
    assert not model.vision_model.bn1.training and model.vision_model.layer4[0].bn1.training
    assert model.vision_model.layer1[0].conv1.weight.grad is None
    assert model.vision_model.layer4[0].conv1.weight.grad is not None
    lock_image_tower(model, unlocked_groups=2)  # a new lock, without freeze_bn_stats, replaces it
    assert model.vision_model.bn1.training and type(model.vision_model.bn1) is torch.nn.BatchNorm2d


def test_a_checkpoints_patch_dropout_is_not_applied_to_a_locked_image_tower(capsys):
    from types import SimpleNamespace

    from hf_clip.training.pretraining import _apply_locks

    model = _model({**TWO_LAYERS, "vision_config": {**TWO_LAYERS["vision_config"], "patch_dropout": 0.5}})
    accelerator = SimpleNamespace(print=print)
    locks = _apply_locks(PretrainArguments(lock_image=True), model, accelerator)
    assert [lock.fully_locked for lock in locks] == [True]
    assert model.vision_model.config.patch_dropout == 0.0
    out = capsys.readouterr().out
    assert "patch_dropout 0.5 is not applied to the locked image tower" in out
    assert f"Trainable parameters: {count_parameters(model)[0]:,} of" in out
    # Partly locked, the tower trains with it.
    model = _model({**TWO_LAYERS, "vision_config": {**TWO_LAYERS["vision_config"], "patch_dropout": 0.5}})
    _apply_locks(PretrainArguments(lock_image=True, lock_image_unlocked_groups=1), model, accelerator)
    assert model.vision_model.config.patch_dropout == 0.5


def test_bad_lock_options_are_refused(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="must be a whole number >= 0, got -1"):
        lock_image_tower(model, -1)
    with pytest.raises(ValueError, match="has 4 parameter groups, so at most 3 can stay unlocked"):
        lock_image_tower(model, 4)
    with pytest.raises(ValueError, match="has 4 parameter groups"):
        lock_text_tower(model, 7)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        lock_image_tower(model, freeze_bn_stats=True)

    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()

    def check(**options) -> None:
        _check_lock_options(PretrainArguments(**{"model": str(pretrained), **options}))

    with pytest.raises(ValueError, match="--lock_image_unlocked_groups must be >= 0"):
        check(lock_image=True, lock_image_unlocked_groups=-2)
    with pytest.raises(ValueError, match="--lock_text_unlocked_layers only applies to a locked tower"):
        check(lock_text_unlocked_layers=2)
    with pytest.raises(ValueError, match="--lock_image_freeze_bn_stats only applies"):
        check(lock_image_freeze_bn_stats=True)
    with pytest.raises(ValueError, match="builds a new, randomly initialised model"):
        check(lock_image=True, model="tiny")
    with pytest.raises(ValueError, match="only the temperature would train"):
        check(lock_image=True, lock_text=True, lock_text_freeze_layer_norm=True)
    with pytest.raises(ValueError, match="--patch_dropout with a fully locked image tower"):
        check(lock_image=True, patch_dropout=0.5)
    # What makes sense passes.
    check(lock_image=True, lock_text=True)  # the text LayerNorms train
    check(lock_image=True, lock_image_unlocked_groups=1, patch_dropout=0.5)


def test_a_refused_lock_leaves_the_model_as_it_was():
    """A lock refused for its BatchNorm layers changes nothing: it used to leave the tower locked (every
    parameter frozen) without the no-grad hooks of a locked tower, or an earlier lock's trainable groups."""
    model = _model()
    lock_image_tower(model, 1)
    trainable = _trainable(model)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        lock_image_tower(model, freeze_bn_stats=True)
    assert _trainable(model) == trainable
    resnet = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model(TINY_RESNET))
    with pytest.raises(TypeError, match="not SyncBatchNorm"):
        lock_image_tower(resnet, freeze_bn_stats=True)
    assert all(p.requires_grad for p in resnet.parameters())


def test_gradcache_runs_a_frozen_tower_once_and_keeps_the_gradients():
    """With a locked ResNet image tower (its BatchNorm normalising each micro-batch), accumulation gives the
    gradients of the same micro-batches without GradCache's second image pass, and each micro-batch updates
    the running statistics once."""
    model = _model(TINY_RESNET).train()
    lock_image_tower(model)
    ids, pixels = _inputs(batch=8, image_size=64)
    micro = list(zip(pixels.chunk(2), ids.chunk(2)))
    calls = []

    def encode_image(px):
        calls.append(px.shape[0])
        return torch.nn.functional.normalize(model.get_image_features(px), dim=-1)

    def encode_text(tokens):
        return torch.nn.functional.normalize(model.get_text_features(tokens), dim=-1)

    def step(frozen: bool) -> tuple[dict, dict]:
        model.zero_grad()
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        contrastive_accumulation_step(
            encode_image,
            encode_text,
            micro,
            ClipLoss(),
            model.logit_scale.exp(),
            model=model,
            image_frozen=frozen,
        )
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        updated = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        model.load_state_dict({**model.state_dict(), **stats})
        return grads, updated

    slow, slow_stats = step(frozen=False)
    assert calls == [4, 4, 4, 4]  # the feature pass, then the (useless) recompute
    calls.clear()
    fast, fast_stats = step(frozen=True)
    assert calls == [4, 4]
    assert (
        fast.keys() == slow.keys() and "logit_scale" in fast and not any(k.startswith("vision") for k in fast)
    )
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=0, atol=1e-6, msg=name)
    for name in fast_stats:  # one update per micro-batch either way
        torch.testing.assert_close(fast_stats[name], slow_stats[name], msg=name)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny ViT CLIP trained for 2 steps, with its tokenizer: what LiT starts from."""
    root = tmp_path_factory.mktemp("pretrained")
    run_pretraining(tiny_args(root, max_steps=2))
    return root / "run"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_lit_run_keeps_the_locked_tower_and_resumes_exactly(tmp_path, pretrained, capsys):
    """GradCache (2 micro-batches) with a locked image tower: the saved image tower is the pretrained one bit
    for bit, the rest trained, the card says so, and a resumed run logs the uninterrupted run's losses."""
    options = dict(
        model=str(pretrained),
        lock_image=True,
        max_steps=4,
        checkpointing_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
    )
    full = tiny_args(tmp_path / "full", **options)
    run_pretraining(full)
    out = capsys.readouterr().out
    assert "Trainable parameters: " in out and "image tower locked (all 3 parameter groups)" in out
    start, end = _weights(pretrained), _weights(Path(full.output_dir))
    image = [k for k in start if k.startswith(("vision_model.", "visual_projection."))]
    assert image and all(torch.equal(start[k], end[k]) for k in image)
    for name in ("logit_scale", "text_projection.weight", "text_model.embeddings.token_embedding.weight"):
        assert not torch.equal(start[name], end[name]), name
    record = json.loads((Path(full.output_dir) / "config.json").read_text())["hf_clip_pretraining"]
    assert record["locked_towers"] == {"image": {"groups": 3, "unlocked_groups": 0, "freeze_bn_stats": False}}
    assert 0 < record["trainable_parameters"] < record["parameters"]
    card = (Path(full.output_dir) / "README.md").read_text()
    assert "| Locked image tower (LiT) | kept at its initial weights (all 3 parameter groups) |" in card

    resumed = tiny_args(tmp_path / "resumed", **options, resume_from_checkpoint="latest")
    run_dir = Path(resumed.output_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(Path(full.output_dir) / "checkpoints" / "step_2", run_dir / "checkpoints" / "step_2")
    run_pretraining(resumed)
    uninterrupted, after = logged_losses(Path(full.output_dir)), logged_losses(run_dir)
    assert [after[s] for s in (3, 4)] == pytest.approx([uninterrupted[s] for s in (3, 4)], abs=1e-6)
    assert all(torch.equal(end[k], v) for k, v in _weights(run_dir).items())
    # A lock is part of what a checkpoint resumes under.
    with pytest.raises(ValueError, match="--lock_image True -> False"):
        run_pretraining(
            tiny_args(
                tmp_path / "resumed", **{**options, "lock_image": False}, resume_from_checkpoint="latest"
            )
        )


def test_lit_with_a_locked_text_tower(tmp_path, pretrained):
    """--lock_text --lock_text_freeze_layer_norm, one micro-batch: the text tower stays, the image tower trains."""
    args = tiny_args(
        tmp_path, model=str(pretrained), lock_text=True, lock_text_freeze_layer_norm=True, max_steps=2
    )
    run_pretraining(args)
    start, end = _weights(pretrained), _weights(Path(args.output_dir))
    text = [k for k in start if k.startswith(("text_model.", "text_projection."))]
    assert text and all(torch.equal(start[k], end[k]) for k in text)
    assert not torch.equal(start["visual_projection.weight"], end["visual_projection.weight"])
    card = (Path(args.output_dir) / "README.md").read_text()
    assert "| Locked text tower (LiT) | kept at its initial weights (all 3 parameter groups) |" in card


def test_lit_resnet_freezes_the_locked_batch_norm_statistics(tmp_path):
    """The ResNet stem and stages 1-3 locked with their BatchNorm statistics: saved bit for bit, buffers too;
    stage 4 and the attention pool train."""
    run_pretraining(tiny_args(tmp_path / "pre", model="tiny", image_size=None, max_steps=1))
    pretrained = tmp_path / "pre" / "run"
    args = tiny_args(
        tmp_path / "lit",
        model=str(pretrained),
        image_size=None,
        lock_image=True,
        lock_image_unlocked_groups=2,
        lock_image_freeze_bn_stats=True,
        max_steps=2,
    )
    run_pretraining(args)
    start, end = _weights(pretrained), _weights(Path(args.output_dir))
    locked = [
        k
        for k in start
        if k.startswith("vision_model.")
        and not k.startswith(("vision_model.layer4.", "vision_model.attnpool."))
    ]
    assert any("running_mean" in k for k in locked)
    assert all(torch.equal(start[k], end[k]) for k in locked)
    for name in (
        "vision_model.layer4.0.conv1.weight",
        "vision_model.layer4.0.bn1.running_mean",
        "vision_model.attnpool.c_proj.weight",
    ):
        assert not torch.equal(start[name], end[name]), name
    card = (Path(args.output_dir) / "README.md").read_text()
    assert (
        "its first 4 of 6 parameter groups kept at their initial weights, the last 2 trained; BatchNorm statistics frozen"
        in card
    )


def test_two_processes_with_a_locked_tower_train_as_one(tmp_path, pretrained):
    """DDP with a locked image tower and GradCache (its gradients averaged by hand): 2 processes x 4 rows give
    one process's losses on 8, and the locked weights stay as they were."""
    options = [f"--model={pretrained}", "--lock_image", "--gradient_accumulation_steps=2"]
    run = _launch(
        tmp_path / "two",
        [*options, "--per_device_train_batch_size=4"],
        *TWO_CPU_PROCESSES,
        "--main_process_port=29565",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one = tiny_args(
        tmp_path / "one",
        model=str(pretrained),
        lock_image=True,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=8,
        max_steps=3,
    )
    run_pretraining(one)
    two_losses, one_losses = logged_losses(tmp_path / "two" / "run"), logged_losses(Path(one.output_dir))
    assert list(two_losses.values()) == pytest.approx(list(one_losses.values()), rel=1e-4)
    start, end = _weights(pretrained), _weights(tmp_path / "two" / "run")
    assert all(
        torch.equal(start[k], end[k]) for k in start if k.startswith(("vision_model.", "visual_projection."))
    )
    assert not torch.equal(start["text_projection.weight"], end["text_projection.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_saves_the_locked_tower_unrounded(tmp_path, pretrained, stage):
    """ZeRO-2/3 in bf16 cast the whole model to bf16 and keep fp32 masters of trainable parameters only: the
    locked tower is saved from the fp32 weights it started from, not from its bf16 copy (ZeRO-3: partitioned
    across the 2 processes, gathered in its no-grad forward)."""
    pytest.importorskip("deepspeed")
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"deepspeed_zero{stage}.yaml"
    run = _launch(
        tmp_path,
        [f"--model={pretrained}", "--lock_image"],
        f"--config_file={config}",
        "--num_processes=2",
        f"--main_process_port={29560 + stage}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    start, end = _weights(pretrained), _weights(tmp_path / "run")
    image = [k for k in start if k.startswith(("vision_model.", "visual_projection."))]
    assert all(end[k].dtype == torch.float32 and torch.equal(start[k], end[k]) for k in image)
    assert not torch.equal(start["text_projection.weight"], end["text_projection.weight"])
