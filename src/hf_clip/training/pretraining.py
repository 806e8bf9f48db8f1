"""The contrastive pretraining run behind `examples/pretrain.py`, on accelerate.

The paper's recipe (section 2.5): symmetric cross-entropy over the global batch (`ClipLoss` gathers
features across processes), AdamW with decay only on weights, cosine schedule with warm-up, the
temperature clamped at 100, random square crops as the only augmentation. Checkpoints are written to a
temporary folder and renamed into place, so a run killed mid-save leaves the previous one usable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import atomic_write_text, give_open_modes
from ..cards import TRAINING_RECORD, render_training_card
from ..configuration_hf_clip import HfClipConfig
from ..modeling_hf_clip import HfClipModel
from .accumulation import average_gradients, contrastive_accumulation_step
from .data import (
    CaptionCollator,
    CaptionDataset,
    EpochBatchSampler,
    StreamingCaptionDataset,
    check_columns,
    prepare_example,
    without_image_decoding,
)
from .locking import TowerLock, count_parameters, lock_image_tower, lock_text_tower, locked_tensors
from .loss import ClipLoss, SigLipLoss
from .optim import clamp_logit_scale, cosine_schedule_with_warmup, create_optimizer

# The default model of the main job: the paper's modified ResNet at toy size (a tiny ViT learns shape far
# more slowly on the built-in data), a 3-layer text tower, 64 px images, a 32-token context. Its token
# embeddings start at unit variance, not OpenAI's 0.02: over 600 steps, held-out colour + shape accuracy
# 63.8% against 57.0% on average (6 and 5 runs, seeds 0-3), shape 76.9% against 69.4%.
TINY_CONFIG = dict(
    projection_dim=128,
    text_config=dict(
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=32,
        token_embedding_std=1.0,
    ),
    vision_config=dict(vision_type="resnet", resnet_layers=[1, 1, 1, 1], hidden_size=16, image_size=64),
)


# About 3.5 minutes on a 2-core CPU; the held-out zero-shot accuracy has plateaued by then.
DEFAULT_SYNTHETIC_STEPS = 600

# A stream is read for at most this many rows to train the tokenizer: a BPE vocabulary of a few thousand
# merges has settled long before, and the run should not first read the whole stream.
TOKENIZER_STREAM_ROWS = 100_000


@dataclass
class PretrainArguments:
    """Command-line options of `examples/pretrain.py` (parsed with transformers' HfArgumentParser)."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Anything datasets.load_dataset takes (Hub name, folder, csv/json/parquet, 'webdataset'); "
            "default: the built-in synthetic shapes dataset."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: str | None = field(
        default=None, metadata={"help": "Glob or path of data files (csv, tar shards...)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Held-out split for periodic evaluation."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding the captions."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (split across processes)."})
    shuffle_buffer: int = field(
        default=10_000,
        metadata={"help": "Streaming: rows shuffled in a buffer of this size (0: stream order)."},
    )
    model: str = field(
        default="tiny", metadata={"help": "'tiny', a preset (ViT-B/32...), a config.json or a model dir."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer dir; default: train BPE on the captions."}
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size when training a tokenizer."})
    output_dir: str = field(
        default="outputs/pretrain", metadata={"help": "Where the model, tokenizer, checkpoints and logs go."}
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps; default: 600 on the built-in data, else --num_train_epochs."},
    )
    num_train_epochs: float = field(
        default=2.0, metadata={"help": "Passes over the data when --max_steps is not set."}
    )
    per_device_train_batch_size: int = field(
        default=128,
        metadata={"help": "Samples per process and micro-batch; the loss sees all processes' samples."},
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per step; all accumulated samples stay negatives (GradCache)."},
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak AdamW learning rate (cosine schedule)."}
    )
    weight_decay: float = field(
        default=0.2,
        metadata={"help": "AdamW weight decay (not on gains, biases, embeddings or the logit scale)."},
    )
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps before the cosine decay."})
    max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "Clip the gradient norm (under DeepSpeed too, replacing its config's gradient_clipping)."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Image resolution of a new model; default: the preset's, 64 for 'tiny' / the built-in data."
        },
    )
    crop_scale: float = field(
        default=0.9, metadata={"help": "Smallest area fraction of the random square crop."}
    )
    loss: str = field(default="clip", metadata={"help": "'clip' (softmax) or 'siglip' (sigmoid)."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in backward: less memory, about 30%% more time."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the model with torch.compile (inductor); the first steps then compile."},
    )
    patch_dropout: float = field(
        default=0.0,
        metadata={"help": "ViT only: fraction of patch tokens dropped per image while training (FLIP)."},
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N steps (atomic); default: none."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint dir or 'latest'."}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Zero-shot evaluation every N steps; default: at the end only."}
    )
    logging_steps: int = field(default=25, metadata={"help": "Log loss, lr and data wait every N steps."})
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker, or 'none'."})
    num_workers: int = field(
        default=2, metadata={"help": "DataLoader worker processes per training process."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights, data order and augmentation."})
    train_samples: int = field(
        default=10_000, metadata={"help": "Size of the built-in synthetic training set."}
    )
    eval_samples: int = field(
        default=600,
        metadata={"help": "Size of the built-in held-out set, or rows evaluated of --eval_split."},
    )
    lock_image: bool = field(
        default=False,
        metadata={
            "help": "LiT: keep the pretrained image tower of --model (a model directory) fixed; fully locked, "
            "it runs without autograd. open_clip's --lock-image."
        },
    )
    lock_image_unlocked_groups: int = field(
        default=0,
        metadata={
            "help": "--lock_image: leave the image tower's last N parameter groups trainable (open_clip's "
            "groups: ViT [embeddings + pre-LN], each block, [last block + post-LN], projection; ResNet stem, "
            "each stage, attention pool)."
        },
    )
    lock_image_freeze_bn_stats: bool = field(
        default=False,
        metadata={
            "help": "--lock_image, ResNet: keep the locked part's BatchNorm layers in eval mode (pretrained "
            "statistics, never updated)."
        },
    )
    lock_text: bool = field(
        default=False,
        metadata={
            "help": "Keep the pretrained text tower of --model fixed (its LayerNorm gains and biases still train "
            "unless --lock_text_freeze_layer_norm, as in open_clip). open_clip's --lock-text."
        },
    )
    lock_text_unlocked_layers: int = field(
        default=0,
        metadata={
            "help": "--lock_text: leave the text tower's last N parameter groups trainable ([embeddings], each "
            "block, [last block + final LN], projection)."
        },
    )
    lock_text_freeze_layer_norm: bool = field(
        default=False,
        metadata={
            "help": "--lock_text: lock the LayerNorm gains and biases of the locked part too (without it they "
            "train, as in open_clip); needed for a text tower that runs without autograd."
        },
    )


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops at that step instead of training on garbage."""


def _load_datasets(args: PretrainArguments) -> tuple[Any, Any]:
    """(train, eval) datasets; eval is None when no held-out split is available."""
    if args.dataset is None:
        from ..data import load_synthetic_clip_dataset

        size = args.image_size or 64
        train = load_synthetic_clip_dataset(
            "train", num_samples=args.train_samples, image_size=size, seed=args.seed
        )
        test = load_synthetic_clip_dataset(
            "test", num_samples=args.eval_samples, image_size=size, seed=args.seed
        )
        return train, test
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"streaming": args.streaming}
    if args.data_files:
        kwargs["data_files"] = args.data_files
    train = load_dataset(args.dataset, args.dataset_config, split=args.train_split, **kwargs)
    evaluation = None
    if args.eval_split:
        evaluation = load_dataset(args.dataset, args.dataset_config, split=args.eval_split, **kwargs)
    return train, evaluation


def _tokenizer_training_captions(dataset: Any, column: str, streaming: bool) -> Iterator[str]:
    """Caption strings to train BPE on: lists flattened, missing or empty captions left out (the training
    loop skips those rows too), images never read."""
    for index, row in enumerate(dataset.select_columns([column])):
        if streaming and index >= TOKENIZER_STREAM_ROWS:
            return
        value = row[column]
        for caption in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(caption, str) and caption.strip():
                yield caption


def _pretrained_overrides(args: PretrainArguments, model: HfClipModel) -> None:
    """Options that change a model being built apply to a loaded one only where they can."""
    if args.image_size and args.image_size != model.config.vision_config.image_size:
        raise ValueError(
            f"--image_size {args.image_size} cannot change the checkpoint's image size "
            f"({model.config.vision_config.image_size}); leave it out when --model is a model directory."
        )
    if args.patch_dropout:
        if model.config.vision_config.vision_type != "vit":
            raise ValueError(
                "--patch_dropout drops ViT patch tokens; this checkpoint's image tower is a ResNet."
            )
        model.config.vision_config.patch_dropout = args.patch_dropout  # read at every training forward
    if args.loss == "siglip" and model.logit_bias is None:
        raise ValueError(
            "--loss siglip needs a model with a logit bias; this checkpoint was trained with the softmax "
            "loss. Use --loss clip, or start a new model (--model tiny, a preset or a config.json)."
        )
    if args.loss == "clip" and model.logit_bias is not None:
        # The softmax loss cannot train the bias (it cancels out), and with several processes DDP then fails
        # on a parameter that received no gradient.
        raise ValueError(
            "This checkpoint was trained with the sigmoid loss (it has a logit bias), which --loss clip cannot "
            "train; pass --loss siglip."
        )


@contextlib.contextmanager
def _without_zero3_init(accelerator: Any) -> Iterator[None]:
    """Load a checkpoint whole, as a fresh model is built. Under ZeRO-3 transformers' from_pretrained builds
    the model inside DeepSpeed's zero.Init, which fails on the 0-d temperature (DeepSpeed cannot broadcast
    0-d tensors); `prepare` partitions the model afterwards either way. (accelerate's
    zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 flag set.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _check_lock_options(args: PretrainArguments) -> None:
    """Lock options that cannot make sense are refused before any data is read (the group counts are checked
    against the model once it is loaded)."""
    for option in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        if getattr(args, option) < 0:
            raise ValueError(f"--{option} must be >= 0 (groups left trainable), got {getattr(args, option)}.")
    for lock, options in (
        ("lock_image", ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats")),
        ("lock_text", ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm")),
    ):
        given = [option for option in options if getattr(args, option)]
        if given and not getattr(args, lock):
            raise ValueError(f"--{given[0]} only applies to a locked tower: add --{lock}, or leave it out.")
    if not (args.lock_image or args.lock_text):
        return
    if not Path(args.model).is_dir():
        raise ValueError(
            f"--lock_image / --lock_text keep a tower at the weights it starts from, and --model {args.model!r} "
            "builds a new, randomly initialised model: the locked tower would stay random, and the other tower "
            "would learn to match random features (not LiT). Pass a pretrained model directory as --model (a "
            "run's --output_dir, or a checkpoint converted with `hf-clip convert`)."
        )
    image_fully = args.lock_image and args.lock_image_unlocked_groups == 0
    text_fully = args.lock_text and args.lock_text_unlocked_layers == 0 and args.lock_text_freeze_layer_norm
    if image_fully and text_fully:
        raise ValueError(
            "--lock_image and --lock_text (with --lock_text_freeze_layer_norm) lock both towers entirely: only "
            "the temperature would train. Leave one tower trainable, or some of its last groups "
            "(--lock_image_unlocked_groups N, --lock_text_unlocked_layers N)."
        )
    if image_fully and args.patch_dropout:
        raise ValueError(
            "--patch_dropout with a fully locked image tower: LiT keeps the pretrained image features as they "
            "are, and dropped patches would change them at every step into features the tower never gives at "
            "inference (where it sees every patch), for the text tower to learn. (The locked tower has no "
            "backward to save.) Leave --patch_dropout out, or unlock its last groups "
            "(--lock_image_unlocked_groups N) to fine-tune them with it."
        )


def _apply_locks(args: PretrainArguments, model: HfClipModel, accelerator: Any) -> list[TowerLock]:
    """Lock the towers the options name (before the optimizer is built: it gets the trainable parameters
    only) and say what trains."""
    locks = []
    if args.lock_image:
        locks.append(
            lock_image_tower(model, args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats)
        )
        vision = model.config.vision_config
        if locks[-1].fully_locked and getattr(vision, "patch_dropout", 0.0):
            accelerator.print(
                f"Note: the checkpoint's patch_dropout {vision.patch_dropout} is not applied to the locked "
                "image tower (see --patch_dropout)."
            )
            vision.patch_dropout = 0.0
    if args.lock_text:
        locks.append(lock_text_tower(model, args.lock_text_unlocked_layers, args.lock_text_freeze_layer_norm))
        if not args.lock_text_freeze_layer_norm:
            accelerator.print(
                "Note: without --lock_text_freeze_layer_norm the locked text layers' LayerNorm gains and biases "
                "train (as in open_clip), so the text tower still runs with autograd."
            )
    if locks and args.gradient_checkpointing:
        # transformers' gradient checkpointing makes every tower's input embeddings output require grad (for
        # reentrant checkpointing, which this script does not use): a partly locked tower then built a graph
        # through its locked layers, and back-propagated through them, for nothing.
        model.disable_input_require_grads()
    trainable, total = count_parameters(model)
    accelerator.print(
        f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)"
        + "".join(f"; {lock.describe()}" for lock in locks)
        + "."
    )
    return locks


def _build_config(
    args: PretrainArguments, vocab_size: int, eos_token_id: int, bos_token_id: int
) -> HfClipConfig:
    """The model to train from scratch; its vocabulary always follows the tokenizer's."""
    if args.model == "tiny":
        config = HfClipConfig(**TINY_CONFIG)
    elif args.model.endswith(".json"):
        config = HfClipConfig.from_json_file(args.model)
    else:
        config = HfClipConfig.from_preset(args.model)
    text = config.text_config
    text.vocab_size, text.eos_token_id, text.bos_token_id = vocab_size, eos_token_id, bos_token_id
    vision_overrides = {"image_size": args.image_size, "patch_dropout": args.patch_dropout or None}
    vision_overrides = {k: v for k, v in vision_overrides.items() if v is not None}
    if vision_overrides:  # rebuilt, so the config validates the new sizes
        config.vision_config = type(config.vision_config)(
            **{**config.vision_config.to_dict(), **vision_overrides}
        )
    if args.patch_dropout and config.vision_config.vision_type != "vit":
        raise ValueError(
            "--patch_dropout drops ViT patch tokens; this model's image tower is a ResNet. Leave it out, or "
            "train a ViT (--model ViT-B/32, or a config.json with vision_type 'vit')."
        )
    if args.loss == "siglip":
        config.logit_scale_init_value, config.logit_bias_init_value = math.log(10.0), -10.0
    return config


def _match_norm_buffers(model: torch.nn.Module) -> None:
    """DeepSpeed's bf16 casts parameters, not buffers: BatchNorm's running statistics stay fp32 beside bf16
    weights, which batch_norm refuses. They follow their layer's weights, as `module.bfloat16()` would do."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != module.weight.dtype:
                    setattr(module, name, buffer.to(module.weight.dtype))


def clamp_temperature(model: HfClipModel, max_scale: float = 100.0) -> None:
    """Clamp exp(logit_scale) at 100 after each step; under ZeRO-3 the value lives in the local partition.

    Under DeepSpeed the optimizer keeps its own fp32 copy of every parameter and writes it back into the
    model after each step: that copy is clamped too, or it keeps growing past log(100) (the forward would
    only ever see the clamped value, but the copy is what the optimizer continues from and what
    zero_to_fp32 and universal checkpoints export)."""
    _clamp_deepspeed_master(model.logit_scale, math.log(max_scale))
    partition = getattr(model.logit_scale, "ds_tensor", None)
    if partition is None:
        clamp_logit_scale(model, max_scale)
    else:
        with torch.no_grad():
            partition.clamp_(max=math.log(max_scale))
            # A parameter this small is "persistent" under ZeRO-3: every process keeps it gathered in
            # `.data`, re-gathered from the partitions only after the NEXT step, and forward reads `.data`.
            # (Empty, so a no-op, for a parameter that is not persistent.)
            model.logit_scale.data.clamp_(max=math.log(max_scale))


def _clamp_deepspeed_master(param: torch.nn.Parameter, limit: float) -> None:
    """Clamp this process's slice of DeepSpeed's fp32 master copy of `param` (ZeRO-1/2/3); no-op without
    DeepSpeed. Local, no collective. (deepspeed.utils.safe_set_full_fp32_param fails under ZeRO-3 for a
    parameter with fewer elements than processes, such as the 1-element logit scale.)"""
    if hasattr(param, "ds_id") and hasattr(param, "_z3_optimizer"):  # ZeRO-3
        fragment, _ = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True)
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer: the fragment we own
        fragment = param._hp_mapping.get_hp_fragment()
    else:
        return
    with torch.no_grad():
        fragment.clamp_(max=limit)


def _with_fp32_master_weights(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed bf16/fp16 the model holds 16-bit copies of weights that the optimizer keeps in fp32:
    the fp32 values are what the run learned, and what a DDP run with the same precision saves. Collective
    (every process gathers each parameter); returns None where `state_dict` is None (other processes)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is not None:
            masters[name.removeprefix("_orig_mod.")] = full.detach().float().cpu()
    if state_dict is None or not masters:
        return state_dict
    # Buffers (BatchNorm statistics, cast to the weights' dtype for DeepSpeed) follow the weights back.
    return {
        key.removeprefix("_orig_mod."): masters.get(
            key.removeprefix("_orig_mod."), value.float() if value.is_floating_point() else value
        )
        for key, value in state_dict.items()
    }


def _training_record(
    args: PretrainArguments,
    steps: int,
    processes: int,
    precision: str,
    pretrained_dir: Path | None,
    locks: list[TowerLock] | None = None,
    parameter_counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """How this run trained the model, saved in its config.json (see hf_clip.cards.training_record). Local
    paths are kept to their last component: a published config should not reveal the trainer's folders."""
    return {
        "script": "examples/pretrain.py",
        "init": f"the weights of {pretrained_dir.name}" if pretrained_dir else "random",
        "dataset": args.dataset
        and (Path(args.dataset).name if Path(args.dataset).exists() else args.dataset),
        "dataset_config": args.dataset_config,
        # `--dataset webdataset|csv|json|parquet` names only the loader: the data are these files.
        "data_files": args.data_files and (Path(args.data_files).name or args.data_files),
        "train_split": args.train_split,
        "steps": steps,
        "global_batch_size": args.per_device_train_batch_size * processes * args.gradient_accumulation_steps,
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": processes,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "warmup_steps": min(args.warmup_steps, steps),
        "loss": args.loss,
        "mixed_precision": precision,
        "seed": args.seed,
        "patch_dropout": args.patch_dropout,
        # LiT: which towers stayed (partly) at their initial weights; the card says so.
        "locked_towers": {lock.tower: _lock_record(lock) for lock in locks or ()},
        **dict(zip(("trainable_parameters", "parameters"), parameter_counts or ())),
    }


def _lock_record(lock: TowerLock) -> dict[str, Any]:
    record = {"groups": lock.groups, "unlocked_groups": lock.unlocked_groups}
    if lock.tower == "image":
        record["freeze_bn_stats"] = lock.freeze_bn_stats
    else:
        record["freeze_layer_norm"] = lock.freeze_layer_norm
    return record


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in (output_dir / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


# The options that fix which rows each step trains on and the schedule it follows: a checkpoint resumes only under
# the same ones (a changed batch size or process count silently re-trained or skipped rows, and a changed
# learning rate or schedule length was silently overridden by the optimizer and scheduler state loaded).
RESUME_KEYS = (
    "dataset",
    "dataset_config",
    "data_files",
    "train_split",
    "streaming",
    "shuffle_buffer",
    "train_samples",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "loss",
    # Another lock trains other parameters, and the optimizer state saved holds only the trainable ones.
    "lock_image",
    "lock_image_unlocked_groups",
    "lock_image_freeze_bn_stats",
    "lock_text",
    "lock_text_unlocked_layers",
    "lock_text_freeze_layer_norm",
)
# A run may be extended (or shortened): its cosine schedule is then recomputed over the new length.
RESUME_LENGTH_KEYS = ("max_steps", "num_train_epochs")


def _resume_settings(args: PretrainArguments, num_processes: int) -> dict[str, Any]:
    keys = RESUME_KEYS + RESUME_LENGTH_KEYS
    return {**{k: getattr(args, k) for k in keys}, "num_processes": num_processes}


def _check_resume_settings(
    path: Path, saved: dict[str, Any] | None, current: dict[str, Any], accelerator: Any
) -> None:
    if saved is None:  # a checkpoint from before the settings were recorded
        return
    changed = [k for k in current if k in saved and saved[k] != current[k]]

    def described(keys: list[str]) -> str:
        return "; ".join(f"--{k} {saved[k]!r} -> {current[k]!r}" for k in keys)

    longer = [k for k in changed if k in RESUME_LENGTH_KEYS]
    if longer:
        accelerator.print(
            f"Note: resuming with {described(longer)}: the learning-rate schedule is recomputed over the new length."
        )
    refused = [k for k in changed if k not in RESUME_LENGTH_KEYS]
    if refused:
        raise ValueError(
            f"{path} was written with other settings than this run: {described(refused)}. Resuming would "
            "train on other rows or another schedule than the checkpointed run. Rerun with its settings "
            "(num_processes: the launcher's --num_processes), or start a new --output_dir."
        )


def _rate_of_this_schedule(scheduler: Any) -> None:
    """After `load_state` the optimizer holds the rate the checkpointed run's schedule set for the next step.
    A run resumed with another length trains that step at its own schedule's rate instead (extending a
    finished run otherwise took its first new step at the old schedule's final rate, 0)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    rates = [base * factor(inner.last_epoch) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, rate in zip(inner.optimizer.param_groups, rates):
        group["lr"] = rate
    inner._last_lr = rates


def _save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    epochs: list[int],
    batch_in_epoch: int,
    skipped: int,
    worker_batches: list[list[int]] | None = None,
    settings: dict[str, Any] | None = None,
) -> None:
    """Full state via accelerate into step_N.tmp, then an atomic rename: readers never see a partial one."""
    final = output_dir / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # save_state has no barrier at its end: every process writes its own files (RNG states, DeepSpeed's
    # optimizer partitions), so the folder is complete only once all of them are done.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(
            json.dumps(
                {
                    "step": step,
                    "epoch": epochs[0],
                    "epochs": epochs,  # [process]
                    "batch": batch_in_epoch,
                    "skipped": skipped,
                    "worker_batches": worker_batches,
                    "settings": settings,
                }
            )
        )
        # A run resumed from an earlier step writes this step again. A folder cannot be renamed over a full
        # one, so the old one is moved aside first and deleted only once the new one is in place.
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def run_pretraining(args: PretrainArguments) -> dict[str, Any]:
    """Train, evaluate and save; returns the final metrics (held-out zero-shot for the built-in data)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
    from tqdm.auto import tqdm

    from ..image_processing_hf_clip import HfClipImageProcessor
    from ..processing_hf_clip import HfClipProcessor
    from ..tokenization_hf_clip import HfClipTokenizer, clip_vocab

    if args.loss not in ("clip", "siglip"):
        raise ValueError(f"--loss must be 'clip' or 'siglip', got {args.loss!r}.")
    _check_lock_options(args)
    output_dir = Path(args.output_dir)
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without a GPU accelerate picks no backend for DeepSpeed and runs each process alone; gloo fixes that.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        kwargs_handlers=handlers,
        # The schedule counts optimizer steps. By default accelerate steps a prepared scheduler once per
        # process per step (for schedules written in single-process steps), which ran ours N times too fast.
        step_scheduler_with_optimizer=False,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    train_data, eval_data = _load_datasets(args)
    check_columns(train_data, args.image_column, args.caption_column)
    if args.streaming and args.shuffle_buffer > 0:
        train_data = train_data.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)

    # Tokenizer: given, from the pretrained model dir, or trained on the captions (main process, then shared).
    pretrained_dir = Path(args.model) if Path(args.model).is_dir() else None
    if args.tokenizer or pretrained_dir:
        source = args.tokenizer or pretrained_dir
        try:
            tokenizer = HfClipTokenizer.from_pretrained(source)
        except OSError as err:  # transformers' message for a missing folder talks about Hub repo ids
            raise FileNotFoundError(
                f"--tokenizer {str(source)!r}: no tokenizer folder there (tokenizer.json or vocab + merges). "
                "Pass a folder written by save_pretrained, or leave --tokenizer out to train one on the captions."
            ) from err
    else:
        tok_dir = output_dir / "tokenizer"
        if accelerator.is_main_process and not (
            args.resume_from_checkpoint and (tok_dir / "tokenizer.json").exists()
        ):
            empty = HfClipTokenizer(vocab=clip_vocab([], ["<start_of_text>", "<end_of_text>"]), merges=[])
            texts = _tokenizer_training_captions(train_data, args.caption_column, args.streaming)
            empty.train_new_from_iterator(texts, vocab_size=args.vocab_size).save_pretrained(tok_dir)
        accelerator.wait_for_everyone()
        tokenizer = HfClipTokenizer.from_pretrained(tok_dir)

    if pretrained_dir:
        HfClipConfig.from_pretrained(pretrained_dir).check_has_text_tower("contrastive training")
        with _without_zero3_init(accelerator):
            model = HfClipModel.from_pretrained(pretrained_dir)
        _pretrained_overrides(args, model)
    else:
        config = _build_config(args, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
        model = HfClipModel(config)
    config = model.config
    context = config.text_config.max_position_embeddings
    tokenizer.model_max_length = context
    size = config.vision_config.image_size
    image_processor = HfClipImageProcessor.for_image_size(size)
    processor = HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if args.gradient_checkpointing:
        # transformers 5.x renamed it (the old name warns of its removal in v6); older 5.x have only the old one.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    locks = _apply_locks(args, model, accelerator)
    parameter_counts = count_parameters(model)  # before DeepSpeed partitions them
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) and (
        accelerator.num_processes > 1 or args.gradient_accumulation_steps > 1
    ):
        accelerator.print(
            "Note: this image tower uses BatchNorm, which normalises over each process's micro-batch of "
            f"{args.per_device_train_batch_size} images: losses and gradients are not those of one process on "
            "the global batch (they are for a ViT image tower)."
        )

    transform = image_processor.train_transform(scale=(args.crop_scale, 1.0))
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        train_rows = StreamingCaptionDataset(
            split_dataset_by_node(train_data, rank=rank, world_size=world),
            args.image_column,
            args.caption_column,
            transform,
            args.seed,
        )
        steps_per_epoch = None
    else:
        train_rows = CaptionDataset(train_data, args.image_column, args.caption_column, transform, args.seed)
        steps_per_epoch = len(train_rows) // (
            args.per_device_train_batch_size * world * args.gradient_accumulation_steps
        )
        if steps_per_epoch == 0:
            raise ValueError(
                f"The dataset has {len(train_rows)} rows, fewer than one global batch "
                f"({args.per_device_train_batch_size} x {world} processes x {args.gradient_accumulation_steps}); "
                "lower --per_device_train_batch_size."
            )
    if args.max_steps is None and steps_per_epoch is None:
        raise ValueError("--streaming needs --max_steps (a stream has no known length).")
    max_steps = args.max_steps or (
        DEFAULT_SYNTHETIC_STEPS
        if args.dataset is None
        else math.ceil(args.num_train_epochs * steps_per_epoch)
    )

    scalars_names = [n for n, p in model.named_parameters() if p.ndim == 0]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        for name in scalars_names:  # DeepSpeed cannot broadcast 0-d tensors; saved back as scalars below
            setattr(model, name, torch.nn.Parameter(getattr(model, name).data.reshape(1)))
    locked_fp32: dict[str, torch.Tensor] = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED and locks and accelerator.is_main_process:
        # DeepSpeed casts the whole model to bf16/fp16 and keeps fp32 master copies of trainable parameters
        # only: the locked weights (and frozen BatchNorm statistics) are saved from these copies, unrounded.
        locked_fp32 = {name: t.float().cpu().clone() for name, t in locked_tensors(model).items()}
    tower = config.vision_config.vision_type
    optimizer = create_optimizer(model, lr=args.learning_rate, weight_decay=args.weight_decay, tower=tower)
    scheduler = cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, max_steps), max_steps)
    if (
        accelerator.state.deepspeed_plugin is not None
    ):  # our DataLoader is not prepared, so say the batch size
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
        ds_config["train_batch_size"] = args.per_device_train_batch_size * accelerator.num_processes
        ds_config["gradient_accumulation_steps"] = 1
        # DeepSpeed clips inside its step (accelerate's clip_grad_norm_ only reports the norm there): same
        # flag, same clipping as without DeepSpeed, instead of the config file's fixed value.
        ds_config["gradient_clipping"] = float(args.max_grad_norm or 0.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        _match_norm_buffers(model)
    if args.torch_compile:
        # Compiled here, after wrapping, as accelerate's dynamo_backend would: accelerate keeps that setting
        # in per-process state, so a second run in the same process (a notebook, a test) silently ignored it.
        if is_deepspeed:
            model.compile(backend="inductor")  # DeepSpeedEngine compiles its module in place
        else:
            model = torch.compile(model)
    raw_model = accelerator.unwrap_model(model)
    if args.torch_compile and args.gradient_accumulation_steps > 1:
        accelerator.print(
            "Note: --gradient_accumulation_steps > 1 runs the towers directly (GradCache), so --torch_compile "
            "does not apply to them."
        )
    if is_deepspeed and args.gradient_accumulation_steps > 1:
        raise ValueError(
            "--gradient_accumulation_steps > 1 uses GradCache, which is not supported under DeepSpeed."
        )
    loss_fn = SigLipLoss() if args.loss == "siglip" else ClipLoss()
    collate = CaptionCollator(tokenizer, context)
    # A fully locked tower runs once per micro-batch under GradCache (its features are final), not twice.
    image_frozen = any(lock.tower == "image" and lock.fully_locked for lock in locks)
    text_frozen = any(lock.tower == "text" and lock.fully_locked for lock in locks)

    step, epoch, start_batch, skipped_before = 0, 0, 0, 0
    num_loader_workers = max(1, args.num_workers)
    # Batches taken from each DataLoader worker of this process in the current epoch (streams resume by it).
    worker_batches = [0] * num_loader_workers
    resume_worker_start: list[int] | None = None  # None: checkpoints from before this was recorded
    found = _checkpoints(output_dir)
    if args.resume_from_checkpoint == "latest" and not found:
        # One command for a preemptible job, first launch included (open_clip's --resume latest).
        accelerator.print(f"No checkpoint in {output_dir / 'checkpoints'} yet: starting from step 0.")
    elif args.resume_from_checkpoint:
        path = found[-1] if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if not (path / "progress.json").exists():
            raise FileNotFoundError(
                f"No complete checkpoint at {path}; checkpoints: {[p.name for p in found]}."
            )
        progress = json.loads((path / "progress.json").read_text())
        _check_resume_settings(path, progress.get("settings"), _resume_settings(args, world), accelerator)
        accelerator.load_state(str(path))
        _rate_of_this_schedule(scheduler)
        step, start_batch = progress["step"], progress["batch"]
        epoch = progress.get("epochs", [progress["epoch"]] * world)[rank]  # this process's own
        log_file = output_dir / "train_log.jsonl"
        if accelerator.is_main_process and log_file.exists():  # drop the lines of steps about to be rerun
            kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
            atomic_write_text(log_file, "".join(line + "\n" for line in kept))
        skipped_before = progress.get("skipped", 0)
        saved_workers = progress.get("worker_batches")  # [process][worker]: batches taken this epoch
        if saved_workers is not None:
            if len(saved_workers) != world:
                raise ValueError(
                    f"{path} was written by {len(saved_workers)} process(es); resume it with as many."
                )
            # This process's own position: processes drift apart when one of them gets a batch whose rows
            # were all skipped (it takes the next one), so the main process's count is not everyone's.
            start_batch = sum(saved_workers[rank])
            worker_batches[0] = start_batch
            if args.streaming:
                if len(saved_workers[rank]) != num_loader_workers:
                    raise ValueError(
                        f"{path} was written with --num_workers {len(saved_workers[rank])}; a stream resumes "
                        "exactly only with the same number of DataLoader workers."
                    )
                worker_batches = list(saved_workers[rank])
                resume_worker_start = list(worker_batches)
        accelerator.print(f"Resumed from {path} at step {step}.")

    if accelerator.log_with:
        accelerator.init_trackers(
            "hf_clip_pretrain",
            config={
                **{k: v for k, v in asdict(args).items() if v is not None},
                "trainable_parameters": parameter_counts[0],
            },
        )

    def loader(epoch: int, start_batch: int) -> torch.utils.data.DataLoader:
        train_rows.epoch = epoch
        common = dict(
            collate_fn=collate,
            num_workers=args.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if args.num_workers else None,
            # Its own generator: a DataLoader otherwise draws its worker seed from the global generator, which
            # then gives patch dropout other numbers after a resume than in an uninterrupted run.
            generator=torch.Generator().manual_seed(args.seed + epoch),
        )
        if args.streaming:
            train_rows.batch_size, train_rows.start_batch = args.per_device_train_batch_size, start_batch
            train_rows.worker_start = resume_worker_start if start_batch else None
            return torch.utils.data.DataLoader(
                train_rows, batch_size=args.per_device_train_batch_size, **common
            )
        sampler = EpochBatchSampler(
            len(train_rows), args.per_device_train_batch_size, rank, world, args.seed, epoch, start_batch
        )
        return torch.utils.data.DataLoader(train_rows, batch_sampler=sampler, **common)

    def forward_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss over the global batch; the temperature comes out of forward (ZeRO-3 only gathers it there).
        The towers run under autocast, the loss outside it: fp32 logits, as in the accumulation path."""
        with accelerator.autocast():
            out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        extra = (out.logit_bias,) if args.loss == "siglip" else ()
        loss = loss_fn(out.image_embeds.float(), out.text_embeds.float(), out.logit_scale.float(), *extra)
        return loss, out.logit_scale.detach()

    def training_step(micro: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(micro) == 1:
            loss, scale = forward_loss(micro[0])
            accelerator.backward(loss)
            return loss.detach(), scale

        def encode_image(px: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return F.normalize(raw_model.get_image_features(px).float(), dim=-1)

        def encode_text(ids: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return F.normalize(raw_model.get_text_features(ids).float(), dim=-1)

        batches = [(b["pixel_values"], b["input_ids"]) for b in micro]
        scale = raw_model.logit_scale.exp()
        loss = contrastive_accumulation_step(
            encode_image,
            encode_text,
            batches,
            loss_fn,
            scale,
            logit_bias=raw_model.logit_bias if args.loss == "siglip" else None,
            backward=accelerator.backward,
            model=raw_model,
            image_frozen=image_frozen,
            text_frozen=text_frozen,
        )
        average_gradients(raw_model)  # the encoders bypassed DDP's hooks
        return loss, scale.detach()

    # Counted per process and summed when logged; the count before a resume is carried by the main process.
    skipped = torch.tensor(skipped_before if accelerator.is_main_process else 0, dtype=torch.long)
    progress = tqdm(
        total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="pretraining"
    )
    window = {"loss": 0.0, "steps": 0, "samples": 0, "data_s": 0.0, "step_s": 0.0}
    model.train()
    while step < max_steps:
        batches = iter(loader(epoch, start_batch))
        batch_in_epoch = start_batch
        exhausted = False
        epoch_start_step = step
        while step < max_steps and not exhausted:
            t0 = time.perf_counter()
            micro = []
            while len(micro) < args.gradient_accumulation_steps:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                batch_in_epoch += 1
                worker_batches[batch.pop("worker")] += 1
                skipped += batch.pop("num_skipped")
                if "input_ids" in batch:
                    micro.append({k: v.to(accelerator.device) for k, v in batch.items()})
            if exhausted:
                break
            t1 = time.perf_counter()
            loss, scale = training_step(micro)
            finite = accelerator.gather(torch.isfinite(loss).reshape(1).to(accelerator.device)).all()
            if not finite:
                raise NonFiniteLossError(
                    f"Non-finite loss ({loss.item()}) at step {step + 1}; lower --learning_rate, set "
                    "--max_grad_norm, or use bf16 instead of fp16."
                )
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step trains with
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_temperature(raw_model)
            step += 1
            progress.update(1)
            t2 = time.perf_counter()
            window["loss"] += loss.item()
            window["steps"] += 1
            window["samples"] += sum(b["input_ids"].shape[0] for b in micro) * world
            window["data_s"] += t1 - t0
            window["step_s"] += t2 - t0
            if step % args.logging_steps == 0 or step == max_steps:
                # The mean over processes: each process's loss is its own rows against the global batch.
                window_loss = torch.tensor(window["loss"] / window["steps"], device=accelerator.device)
                logs = {
                    "loss": accelerator.reduce(window_loss, "mean").item(),
                    "lr": lr,
                    "temperature": scale.float().mean().item(),
                    "samples_per_s": window["samples"] / window["step_s"],
                    "data_wait_fraction": window["data_s"] / window["step_s"],
                    "skipped_samples": int(accelerator.reduce(skipped.to(accelerator.device), "sum")),
                }
                progress.set_postfix(loss=f"{logs['loss']:.3f}", T=f"{logs['temperature']:.1f}")
                accelerator.log(logs, step=step)
                if accelerator.is_main_process:
                    with open(output_dir / "train_log.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **logs}) + "\n")
                window = dict.fromkeys(window, 0.0)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                dropped = int(accelerator.reduce(skipped.to(accelerator.device), "sum"))
                # Each process's epoch and batches per worker: a process whose stream ends earlier, or that
                # skipped a whole batch, starts its next epoch before the others.
                position = torch.tensor([epoch, *worker_batches], device=accelerator.device)
                per_process = accelerator.gather(position).view(world, 1 + num_loader_workers).tolist()
                _save_checkpoint(
                    accelerator,
                    output_dir,
                    step,
                    [row[0] for row in per_process],
                    batch_in_epoch,
                    dropped,
                    [row[1:] for row in per_process],
                    _resume_settings(args, world),
                )
            if args.eval_steps and step % args.eval_steps == 0 and eval_data is not None:
                metrics = evaluate(raw_model, tokenizer, image_processor, eval_data, args, accelerator)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                model.train()
        if exhausted:
            if step == epoch_start_step and start_batch == 0:
                # Every row of a whole epoch was skipped (or there were too few for one step): stop instead of
                # starting epoch after epoch forever. This process's own count: a collective here would wait
                # forever for processes whose data did not run out.
                raise ValueError(
                    f"A whole epoch gave no training step on process {rank}: {int(skipped)} rows skipped so far "
                    "as unreadable images "
                    f"or empty captions. Check --image_column ({args.image_column!r}) and --caption_column "
                    f"({args.caption_column!r}) and the data itself."
                )
            epoch, start_batch = epoch + 1, 0
            worker_batches = [0] * num_loader_workers
    progress.close()

    total_skipped = int(accelerator.reduce(skipped.to(accelerator.device), "sum"))
    if total_skipped:
        accelerator.print(f"Skipped {total_skipped} unreadable images or empty captions.")
    # The model is saved before the final evaluation, so a problem there never costs the trained weights.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if is_deepspeed:
        state_dict = _with_fp32_master_weights(raw_model, state_dict)
        if state_dict is not None:
            state_dict.update(locked_fp32)
    if state_dict is not None:
        state_dict = {
            k.removeprefix("_orig_mod."): v for k, v in state_dict.items()
        }  # torch.compile's wrapper
        state_dict = {k: v.reshape(()) if k in scalars_names else v for k, v in state_dict.items()}
    if accelerator.is_main_process:
        # What the model is: `hf-clip card` and `hf-clip push` write the card of this run from it, never the
        # paper's card of a model that happens to have a paper architecture.
        setattr(
            raw_model.config,
            TRAINING_RECORD,
            _training_record(
                args, step, world, accelerator.mixed_precision, pretrained_dir, locks, parameter_counts
            ),
        )
        # Written beside the run's other files, then moved in file by file: a crash never leaves a
        # half-written model.safetensors (a previous model's files stay whole until replaced).
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".model.tmp."))
        try:
            raw_model.save_pretrained(staging, state_dict=state_dict)
            if is_deepspeed:  # config.json names the model's (16-bit) dtype; the weights saved are fp32
                raw_model.config.dtype = "float32"
                raw_model.config.save_pretrained(staging)
            processor.save_pretrained(staging)
            give_open_modes(staging)
            for entry in sorted(staging.iterdir()):
                os.replace(entry, output_dir / entry.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    metrics = (
        evaluate(raw_model, tokenizer, image_processor, eval_data, args, accelerator) if eval_data else {}
    )
    if accelerator.is_main_process:
        results = {"steps": step, "num_processes": world, "metrics": metrics}
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
        atomic_write_text(output_dir / "README.md", render_training_card(raw_model.config, metrics))
    # Every rank tears the process group down together: a rank that destroys it (and exits) while another is
    # still saving can leave gloo worker threads holding tensors at interpreter exit, which aborts the process.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


@torch.inference_mode()
def evaluate(
    model: HfClipModel,
    tokenizer: Any,
    image_processor: Any,
    dataset: Any,
    args: PretrainArguments,
    accelerator: Any,
) -> dict[str, float]:
    """Held-out zero-shot top-1 per attribute and for the (colour, shape) combination on the built-in data;
    image-to-text recall@1 within the held-out set for any other dataset."""
    from ..data import SYNTHETIC_ATTRIBUTES, synthetic_zero_shot_templates
    from ..zero_shot import ZeroShotClassifier

    model.eval()
    device = accelerator.device
    if args.dataset is None:
        pixel_values = image_processor(list(dataset["image"]), return_tensors="pt")["pixel_values"].to(device)
        image_embeds = F.normalize(model.get_image_features(pixel_values).float(), dim=-1)
        metrics = {}
        for attribute in [*SYNTHETIC_ATTRIBUTES, "combination"]:
            names = dataset.features[attribute].names
            classifier = ZeroShotClassifier.from_model(
                model,
                tokenizer,
                names,
                synthetic_zero_shot_templates(attribute),
                device=device,
                progress=False,
            )
            predictions = classifier(image_embeds=image_embeds).argmax(-1).cpu()
            metrics[f"zero_shot_top1/{attribute}"] = (
                (predictions == torch.tensor(dataset[attribute])).float().mean().item()
            )
        return metrics
    n = args.eval_samples
    rows = dataset.take(n) if args.streaming else dataset.select(range(min(n, len(dataset))))
    rows = without_image_decoding(rows, args.image_column)
    images, captions = [], []
    for row in rows:  # the rows training would skip are skipped here too
        example = prepare_example(row, args.image_column, args.caption_column, lambda image, _: image, None)
        if example is not None:
            images.append(example["pixel_values"])
            captions.append(example["caption"])
    if not images:
        accelerator.print(f"No readable row among the first {n} of the evaluation split: nothing evaluated.")
        return {}
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].to(device)
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"].to(
        device
    )
    image_embeds = F.normalize(model.get_image_features(pixel_values).float(), dim=-1)
    text_embeds = F.normalize(model.get_text_features(ids).float(), dim=-1)
    hits = (image_embeds @ text_embeds.t()).argmax(-1) == torch.arange(len(images), device=device)
    return {"retrieval_recall@1/image_to_text": hits.float().mean().item()}
