"""Fine-tuning with `transformers.Trainer` as its `run_clip.py` example does: a collator of pixel_values,
input_ids, attention_mask and `return_loss=True`; evaluation, prediction, gradient checkpointing, bf16 on the
CPU, checkpoints (resume, best model, Auto and remote-code loading) and frozen towers. Tiny models only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from test_modeling import tiny_config
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoProcessor,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_clip import HfClipImageProcessor, HfClipModel, HfClipProcessor, HfClipTokenizer

WORDS = ["red", "blue", "green", "cat", "dog", "circle", "square", "big", "small", "photo"]


def tiny_model(vision_type: str) -> HfClipModel:
    torch.manual_seed(0)
    model = HfClipModel(tiny_config(vision_type))
    # A released ResNet's last batch-norm gains are not zero (they start at zero for training from scratch):
    # with them, every convolution of a block receives gradients from the first step.
    for module in model.modules():
        if hasattr(module, "bn3"):
            torch.nn.init.ones_(module.bn3.weight)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    return HfClipTokenizer.from_openai_bpe()


class PairDataset(torch.utils.data.Dataset):
    """Rows as run_clip.py's datasets give them: a pixel tensor, token ids and mask as lists."""

    def __init__(self, tokenizer: HfClipTokenizer, n: int, image_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, image_size, image_size, generator=generator)
        picks = torch.randint(0, len(WORDS), (n, 4), generator=generator).tolist()
        captions = [" ".join(WORDS[i] for i in row) for row in picks]
        self.text = tokenizer(captions, max_length=16, padding="max_length", truncation=True)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {
            "pixel_values": self.pixels[i],
            "input_ids": self.text["input_ids"][i],
            "attention_mask": self.text["attention_mask"][i],
        }


def collate_fn(examples: list[dict]) -> dict:
    """run_clip.py's collator."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor([e["attention_mask"] for e in examples], dtype=torch.long),
        "return_loss": True,
    }


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    kwargs = dict(
        remove_unused_columns=False,
        use_cpu=True,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(str(output_dir), **{**kwargs, **overrides})


def logged_losses(trainer: Trainer) -> dict[int, float]:
    """Training loss by step (a resumed run's history starts with its checkpoint's)."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Parameters and buffers (batch-norm running statistics included), bit for bit."""
    expected = b.state_dict()
    for name, value in a.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_trains_evaluates_and_predicts(tmp_path, tokenizer, vision_type):
    model = tiny_model(vision_type)
    data = PairDataset(tokenizer, 16, model.config.vision_config.image_size)
    args = training_args(tmp_path, max_steps=6)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collate_fn)
    # No label names and `return_loss` defaults to None, as in transformers' CLIPModel: evaluation gets its loss
    # from the batch's `return_loss=True`.
    assert trainer.label_names == [] and not trainer.can_return_loss
    trainer.train()
    losses = list(logged_losses(trainer).values())
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    assert trainer.state.total_flos > 0  # Trainer's FLOPs estimate reads `main_input_name` (input_ids)

    loss = trainer.evaluate()["eval_loss"]
    assert np.isfinite(loss)
    prediction = trainer.predict(data)
    logits_per_image, logits_per_text = prediction.predictions[:2]
    assert logits_per_image.shape == logits_per_text.shape == (16, 8)
    assert prediction.metrics["test_loss"] == pytest.approx(loss)


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_gradient_checkpointing_trains_the_same_model(tmp_path, tokenizer, vision_type):
    def run(**overrides) -> tuple[HfClipModel, dict[int, float], int]:
        model = tiny_model(vision_type)
        calls = [0]
        for module in model.modules():  # called inside the checkpointed blocks: counts their recomputation
            if type(module).__name__ in ("HfClipAttention", "BatchNorm2d"):
                module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        data = PairDataset(tokenizer, 16, model.config.vision_config.image_size)
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, max_steps=2, **overrides),
            train_dataset=data,
            data_collator=collate_fn,
        )
        trainer.train()
        return model, logged_losses(trainer), calls[0]

    plain, plain_losses, plain_calls = run()
    for kwargs in ({}, {"use_reentrant": True}):
        model, losses, calls = run(gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
        assert calls > plain_calls, kwargs  # the blocks did run again in the backward pass
        assert losses == plain_losses
        assert_same_state(model, plain)  # ResNet: each step updates the running statistics once


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_bf16_on_cpu(tmp_path, tokenizer, vision_type):
    model = tiny_model(vision_type)
    data = PairDataset(tokenizer, 16, model.config.vision_config.image_size)
    args = training_args(tmp_path, max_steps=2, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collate_fn)
    trainer.train()
    losses = list(logged_losses(trainer).values())
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert model.dtype == torch.float32  # autocast: the weights stay fp32
    assert np.isfinite(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_resume_from_checkpoint_continues_identically(tmp_path, tokenizer, vision_type):
    def trainer_for(output_dir: Path) -> Trainer:
        model = tiny_model(vision_type)
        data = PairDataset(tokenizer, 32, model.config.vision_config.image_size)
        args = training_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        return Trainer(model=model, args=args, train_dataset=data, data_collator=collate_fn)

    uninterrupted = trainer_for(tmp_path / "full")
    uninterrupted.train()
    # An interrupted run: the same schedule, stopped after its first checkpoint.
    (tmp_path / "resumed").mkdir()
    (tmp_path / "full" / "checkpoint-2").rename(tmp_path / "resumed" / "checkpoint-2")
    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)

    assert logged_losses(resumed) == logged_losses(uninterrupted)
    assert_same_state(resumed.model, uninterrupted.model)


@pytest.fixture(scope="module")
def best_model_run(tmp_path_factory, tokenizer) -> Trainer:
    """Evaluated and saved every 2 of 4 steps with the processor; the *highest* loss counts as best, so that
    `load_best_model_at_end` has to go back to the first checkpoint."""
    output_dir = tmp_path_factory.mktemp("best")
    model = tiny_model("vit")
    processor = HfClipProcessor(image_processor=HfClipImageProcessor.for_image_size(32), tokenizer=tokenizer)
    args = training_args(
        output_dir,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=PairDataset(tokenizer, 32, 32),
        eval_dataset=PairDataset(tokenizer, 8, 32, seed=1),
        data_collator=collate_fn,
        processing_class=processor,
    )
    trainer.train()
    return trainer


def test_load_best_model_at_end(best_model_run):
    trainer = best_model_run
    evaluations = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evaluations) == [2, 4] and evaluations[2] > evaluations[4]
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    assert_same_state(trainer.model, AutoModel.from_pretrained(trainer.state.best_model_checkpoint))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evaluations[2], abs=1e-6)


_REMOTE_LOAD = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_clip":
            raise ImportError("hf_clip is blocked in this interpreter")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
text = tokenizer(["a red cat"], max_length=16, padding="max_length", truncation=True, return_tensors="pt")
pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(**text, pixel_values=pixels).logits_per_image
print(json.dumps([type(model).__module__, image_processor.crop_size["height"], logits.item()]))
"""


def test_checkpoint_folder_loads_with_auto_classes_and_remote_code(best_model_run, tokenizer):
    folder = Path(best_model_run.state.best_model_checkpoint)
    model = AutoModel.from_pretrained(folder).eval()
    assert isinstance(model, HfClipModel)
    assert isinstance(AutoProcessor.from_pretrained(folder), HfClipProcessor)
    assert isinstance(AutoTokenizer.from_pretrained(folder), HfClipTokenizer)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), HfClipImageProcessor)
    text = tokenizer(["a red cat"], max_length=16, padding="max_length", truncation=True, return_tensors="pt")
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(**text, pixel_values=pixels).logits_per_image.item()

    run = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    module, crop, logit = json.loads(run.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules") and crop == 32
    assert logit == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "vision_type,frozen", [("vit", "vision_model"), ("vit", "text_model"), ("resnet", "vision_model")]
)
def test_run_clip_recipe_with_a_frozen_tower(tmp_path, tokenizer, vision_type, frozen):
    """What run_clip.py reads from the Auto classes, its caption tokenization and image transform, and its
    `_freeze_params`: the frozen tower's parameters stay as they were, the rest trains."""
    from torchvision.transforms import CenterCrop, ConvertImageDtype, Normalize, Resize
    from torchvision.transforms.functional import InterpolationMode

    size = tiny_config(vision_type).vision_config.image_size
    tiny_model(vision_type).save_pretrained(tmp_path / "model")
    HfClipProcessor(HfClipImageProcessor.for_image_size(size), tokenizer).save_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    image_processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    model = AutoModel.from_pretrained(tmp_path / "model")
    config = model.config
    assert config.vision_config.image_size == size
    assert image_processor.size["shortest_edge"] == image_processor.crop_size["height"] == size
    assert config.text_config.max_position_embeddings == 77

    transform = torch.nn.Sequential(
        Resize([size], interpolation=InterpolationMode.BICUBIC, antialias=True),
        CenterCrop(size),
        ConvertImageDtype(torch.float),
        Normalize(image_processor.image_mean, image_processor.image_std),
    )
    rng = np.random.default_rng(0)
    dataset = Dataset.from_dict(
        {
            "image": [rng.integers(0, 256, (3, 40, 48), dtype=np.uint8) for _ in range(16)],
            "caption": [" ".join(rng.choice(WORDS, 5)) for _ in range(16)],
        }
    )

    def tokenize_captions(examples: dict) -> dict:
        text = tokenizer(
            examples["caption"],
            max_length=config.text_config.max_position_embeddings,
            padding="max_length",
            truncation=True,
        )
        examples["input_ids"], examples["attention_mask"] = text.input_ids, text.attention_mask
        return examples

    def transform_images(examples: dict) -> dict:
        examples["pixel_values"] = [
            transform(torch.tensor(np.array(im, dtype=np.uint8))) for im in examples["image"]
        ]
        return examples

    dataset = dataset.map(tokenize_captions, batched=True, remove_columns=["caption"])
    dataset.set_transform(transform_images)

    for param in getattr(model, frozen).parameters():
        param.requires_grad = False
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=dataset,
        data_collator=collate_fn,
    )
    trainer.train()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == name.startswith(frozen + "."), name


def test_tokenizer_fingerprint_is_unchanged_by_calls(tmp_path, tokenizer):
    """`datasets` names a `.map` by hashing the function with the tokenizer it uses: run_clip.py tokenizes with
    `load_from_cache_file=True`, and the same map must find its cache again after the tokenizer has been used."""
    tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # never called yet
    dataset = Dataset.from_dict({"caption": ["a red cat", "a blue dog"]})

    def tokenize(examples: dict) -> dict:
        return dict(tokenizer(examples["caption"], max_length=77, padding="max_length", truncation=True))

    fresh = Hasher.hash(tokenizer)
    first = dataset.map(tokenize, batched=True)._fingerprint
    tokenizer(["a photo"], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    assert Hasher.hash(tokenizer) == fresh
    assert dataset.map(tokenize, batched=True)._fingerprint == first


def test_clip_recipe_in_the_trainer_clamps_the_temperature(tmp_path, tokenizer):
    """hf_clip's decay groups as the Trainer's optimizer, and the temperature clamped after every step: a model
    whose temperature starts above the cap (200) trains at 100 from the second step."""
    import math

    from hf_clip.training import ClampLogitScaleCallback, create_optimizer, weight_decay_split

    model = tiny_model("vit")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    data = PairDataset(tokenizer, 16, model.config.vision_config.image_size)
    optimizer = create_optimizer(model, lr=1e-3, weight_decay=0.2, tower="vit")
    seen = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(float(model.logit_scale.detach().exp()))

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=data,
        data_collator=collate_fn,
        optimizers=(optimizer, None),
        callbacks=[Record(), ClampLogitScaleCallback()],
    )
    trainer.train()
    assert seen[0] == pytest.approx(200.0) and all(s <= 100.0 + 1e-4 for s in seen[1:]), seen
    assert float(model.logit_scale.exp()) <= 100.0 + 1e-4
    classifier = AutoModelForImageClassification.from_config(model.config)  # no temperature: refused at once
    size = model.config.vision_config.image_size
    rows = [{"pixel_values": torch.zeros(3, size, size), "labels": 0}]
    args = training_args(tmp_path / "c", max_steps=1)
    with pytest.raises(AttributeError, match="no temperature"):
        Trainer(
            model=classifier, args=args, train_dataset=rows, callbacks=[ClampLogitScaleCallback()]
        ).train()
    no_decay = set(weight_decay_split(model)[1])
    assert "logit_scale" in no_decay and trainer.optimizer.param_groups[1]["weight_decay"] == 0.0
