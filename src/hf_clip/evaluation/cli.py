"""``hf-clip eval ...``: the paper's evaluations from the command line.

``add_eval_parser(subparsers)`` registers ``eval`` with the subcommands zero-shot, linear-probe, retrieval
and robustness, and returns the ``eval`` subparsers so further evaluations (the bias probes) can add
theirs. Every subcommand stores its runner in ``args.eval_func`` (a callable ``args -> EvalResult``);
``run_eval(args)`` runs it and writes the JSON, markdown and PNG outputs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from datasets import Dataset

from .loading import check_dataset, load_eval_dataset, parse_classnames, resolve_labels
from .reporting import EvalResult, save_result

logger = logging.getLogger(__name__)


def _flag(name: str) -> list[str]:
    """Accept both ``--image_column`` and ``--image-column``."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


def _common_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model and run")
    group.add_argument("--model", required=True, help="hf_clip model directory (save_pretrained output).")
    group.add_argument(*_flag("batch_size"), dest="batch_size", type=int, default=64)
    group.add_argument(
        *_flag("num_workers"), dest="num_workers", type=int, default=2, help="DataLoader workers."
    )
    group.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1, cpu...; when not given (%(default)s), cuda if available.",
    )
    group.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="bf16/fp16 run the towers under autocast.",
    )
    group.add_argument(
        *_flag("cache_dir"),
        dest="cache_dir",
        default=None,
        help="Cache extracted features here (safetensors).",
    )
    group.add_argument(
        *_flag("output_dir"), dest="output_dir", default="eval_results", help="Where results go."
    )
    group.add_argument(
        *_flag("max_samples"), dest="max_samples", type=int, default=None, help="Use only the first N rows."
    )
    return parser


def _data_parser(label: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        required=True,
        help="Hub name, imagefolder/data directory, csv/json/parquet file, or save_to_disk directory.",
    )
    group.add_argument(
        *_flag("dataset_config"), dest="dataset_config", default=None, help="Hub dataset config name."
    )
    group.add_argument(*_flag("image_column"), dest="image_column", default="image", help="Image column.")
    if label:
        group.add_argument(*_flag("label_column"), dest="label_column", default="label", help="Label column.")
        group.add_argument(
            "--classnames",
            default=None,
            help="Class names in label order: 'a,b,c', a file (one per line, or a json list), or a shipped set "
            "(e.g. imagenet1k). Default: the label column's ClassLabel names.",
        )
    return parser


def _add_templates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--templates",
        default="a photo of a {}.",
        help="Prompt templates: a shipped set (imagenet, cifar10, ...), a file with one template per line, "
        "or one template containing '{}'.",
    )


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register ``eval`` and its subcommands; returns the ``eval`` subparsers for further subcommands."""
    common = _common_parser()
    eval_parser = subparsers.add_parser(
        "eval",
        help="Evaluate a model: zero-shot, linear probe, retrieval, robustness, bias probes.",
        description="The paper's evaluations. Each writes <task>_<dataset>[_<split>].json, .md and .png to "
        "--output_dir (the split is named when it is not 'test').",
    )
    tasks = eval_parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")

    zero_shot = tasks.add_parser(
        "zero-shot",
        parents=[common, _data_parser()],
        help="Zero-shot classification (top-1/5, mean per-class).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    zero_shot.add_argument("--split", default="test", help="Split to evaluate.")
    _add_templates(zero_shot)
    zero_shot.set_defaults(eval_func=_run_zero_shot)

    probe = tasks.add_parser(
        "linear-probe",
        parents=[common, _data_parser()],
        help="Logistic-regression probe on frozen features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    probe.add_argument("--split", default="test", help="Split the final probe is scored on.")
    probe.add_argument(
        *_flag("train_split"), dest="train_split", default="train", help="Split the probe fits."
    )
    probe.add_argument(
        *_flag("val_split"),
        dest="val_split",
        default=None,
        help="Validation split (default: carve from train).",
    )
    probe.add_argument(
        *_flag("val_fraction"), dest="val_fraction", type=float, default=0.2, help="Share of train held out."
    )
    probe.add_argument(
        *_flag("probe_features"),
        dest="probe_features",
        choices=["pooled", "projected"],
        default="pooled",
        help="pooled: image tower output before the projection (the paper's choice); projected: joint space.",
    )
    probe.add_argument(
        *_flag("selection_metric"),
        dest="selection_metric",
        choices=["top1_accuracy", "mean_per_class_recall"],
        default="top1_accuracy",
        help="Validation metric that picks C.",
    )
    probe.add_argument(*_flag("max_iter"), dest="max_iter", type=int, default=1000, help="L-BFGS iterations.")
    probe.add_argument("--seed", type=int, default=0, help="Seed of the validation split.")
    probe.set_defaults(eval_func=_run_linear_probe)

    retrieval = tasks.add_parser(
        "retrieval",
        parents=[common, _data_parser(label=False)],
        help="Image-text retrieval recall@k.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    retrieval.add_argument("--split", default="test", help="Split to evaluate.")
    retrieval.add_argument(
        *_flag("caption_column"),
        dest="caption_column",
        default="caption",
        help="A caption or a list of captions.",
    )
    retrieval.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="Recall@k cut-offs.")
    retrieval.set_defaults(eval_func=_run_retrieval)

    robustness = tasks.add_parser(
        "robustness",
        parents=[common, _data_parser()],
        help="Zero-shot accuracy under distribution shift.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    robustness.add_argument("--split", default="test", help="Split used for every dataset.")
    robustness.add_argument(
        *_flag("shift_datasets"),
        dest="shift_datasets",
        nargs="+",
        required=True,
        help="Datasets sharing --dataset's label set (or a subset of it).",
    )
    robustness.add_argument(
        *_flag("no_restrict"),
        dest="restrict",
        action="store_false",
        help="Score subset datasets over all reference classes instead of only the classes they cover.",
    )
    _add_templates(robustness)
    robustness.set_defaults(eval_func=_run_robustness)
    return tasks


def _load_model(args: argparse.Namespace, image_only: bool = False) -> tuple[Any, Any]:
    """The model and processor of ``--model``. With ``image_only`` (evaluations that read image features
    alone) a fine-tuned HfClipForImageClassification folder is taken too, with its image processor only."""
    from ..configuration_hf_clip import HfClipConfig
    from ..image_processing_hf_clip import HfClipImageProcessor
    from ..modeling_hf_clip import HfClipForImageClassification, HfClipModel
    from ..processing_hf_clip import HfClipProcessor
    from ..tokenization_hf_clip import HfClipTokenizer

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"--model {args.model} is not a directory; pass a save_pretrained model folder."
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {args.model} has no config.json, so it is not a save_pretrained hf_clip folder; convert "
            "a checkpoint into one with `hf-clip convert SRC OUT_DIR` and pass OUT_DIR."
        )
    config = HfClipConfig.from_pretrained(str(model_dir))
    classifier = "HfClipForImageClassification" in (config.architectures or [])
    if not image_only:
        config.check_has_text_tower(
            "this evaluation, which needs the text tower (robustness and linear-probe take a classifier)"
        )
    device = _device(args.device)
    try:
        model_cls = HfClipForImageClassification if classifier else HfClipModel
        model = model_cls.from_pretrained(str(model_dir)).to(device).eval()
        # Built from its parts so loading needs no Auto-class registration of the image processor.
        image_processor = HfClipImageProcessor.from_pretrained(str(model_dir))
        if classifier:
            processor = SimpleNamespace(image_processor=image_processor)
        else:
            processor = HfClipProcessor(
                image_processor=image_processor, tokenizer=HfClipTokenizer.from_pretrained(str(model_dir))
            )
    except OSError as err:  # missing weights, tokenizer or image-processor files
        raise FileNotFoundError(
            f"--model {args.model} is not a complete hf_clip folder ({str(err).splitlines()[0]}); it needs the "
            "weights, tokenizer and image processor that `hf-clip convert` or save_pretrained of the model "
            "and its processor write (a classifier folder: the weights and image processor)."
        ) from err
    args.device = device
    return model, processor


def _device(name: str | None) -> str:
    """--device checked before the model loads: torch's own errors for a bad name or a missing GPU come only
    when the weights move, as a traceback."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"--device {name} is not a device name torch knows; use cpu, cuda or cuda:N."
        ) from err
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise ValueError(
            f"--device {name}: no {device.type} device is available here; leave --device out to use the CPU."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return name


def _load(args: argparse.Namespace, name: str, split: str | None) -> Dataset:
    dataset = load_eval_dataset(
        name, split, config_name=getattr(args, "dataset_config", None), image_column=args.image_column
    )
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    return dataset


def _dataset_name(name: str) -> str:
    path = Path(name)
    return path.name if path.exists() else name


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The model and run flags as the keyword arguments every evaluation (and the bias probes) takes."""
    return {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "dtype": None if args.dtype == "fp32" else args.dtype,
        "device": args.device,
        "cache_dir": args.cache_dir,
        "model_name": args.model,
    }


def _classnames(args: argparse.Namespace) -> list[str] | None:
    spec = args.classnames
    if spec and "," not in spec and not Path(spec).expanduser().is_file():  # a folder "cifar10" is data
        from ..zero_shot import templates as shipped

        if shipped.is_known_dataset(spec):
            return shipped.get_classnames(spec)
    return parse_classnames(spec)


def _precheck(
    dataset: Dataset, args: argparse.Namespace, name: str, classnames: list[str] | None = None
) -> None:
    """Fail on bad columns, empty data or unnamed labels before spending time loading the model."""
    label_column = getattr(args, "label_column", None)
    columns = [args.image_column, label_column or args.caption_column]
    check_dataset(dataset, columns, name=name)
    if label_column is not None:
        resolve_labels(dataset, label_column, classnames)


def _run_on_split(
    args: argparse.Namespace, evaluate: Callable[..., EvalResult], dataset: Dataset, **task_kwargs: Any
) -> EvalResult:
    """Load the model, run ``evaluate`` on the prechecked ``--split`` of ``--dataset``, record the split."""
    model, processor = _load_model(args)
    result = evaluate(
        model,
        processor,
        dataset,
        image_column=args.image_column,
        dataset_name=_dataset_name(args.dataset),
        **task_kwargs,
        **_run_kwargs(args),
    )
    result.config["split"] = args.split
    return result


def _run_zero_shot(args: argparse.Namespace) -> EvalResult:
    from .zero_shot import evaluate_zero_shot

    dataset = _load(args, args.dataset, args.split)
    classnames = _classnames(args)
    _precheck(dataset, args, _dataset_name(args.dataset), classnames)
    return _run_on_split(
        args,
        evaluate_zero_shot,
        dataset,
        label_column=args.label_column,
        classnames=classnames,
        templates=args.templates,
    )


def _run_linear_probe(args: argparse.Namespace) -> EvalResult:
    from .linear_probe import evaluate_linear_probe

    train = _load(args, args.dataset, args.train_split)
    test = _load(args, args.dataset, args.split)
    val = _load(args, args.dataset, args.val_split) if args.val_split else None
    for split, ds in (("train", train), ("test", test), ("validation", val)):
        if ds is not None:
            check_dataset(ds, [args.image_column, args.label_column], name=f"{args.dataset} ({split} split)")
    model, processor = _load_model(args, image_only=True)
    result = evaluate_linear_probe(
        model,
        processor,
        train,
        test,
        val,
        image_column=args.image_column,
        label_column=args.label_column,
        classnames=_classnames(args),
        feature=args.probe_features,
        val_fraction=args.val_fraction,
        selection_metric=args.selection_metric,
        max_iter=args.max_iter,
        seed=args.seed,
        dataset_name=_dataset_name(args.dataset),
        **_run_kwargs(args),
    )
    result.config.update({"split": args.split, "train_split": args.train_split, "val_split": args.val_split})
    return result


def _run_retrieval(args: argparse.Namespace) -> EvalResult:
    from .retrieval import evaluate_retrieval

    dataset = _load(args, args.dataset, args.split)
    _precheck(dataset, args, _dataset_name(args.dataset))
    return _run_on_split(args, evaluate_retrieval, dataset, caption_column=args.caption_column, k=args.k)


def _run_robustness(args: argparse.Namespace) -> EvalResult:
    from .robustness import evaluate_robustness

    names = [args.dataset, *args.shift_datasets]
    labels = [_dataset_name(n) for n in names]
    if len(set(labels)) != len(labels):
        labels = names  # two datasets with the same folder name: fall back to the full spelling
    if len(set(labels)) != len(labels):
        raise ValueError(f"Each dataset may be given once; got {', '.join(names)}.")
    datasets = {label: _load(args, name, args.split) for label, name in zip(labels, names)}
    classnames = _classnames(args)
    _precheck(datasets[labels[0]], args, labels[0], classnames)
    for label in labels[1:]:
        check_dataset(datasets[label], [args.image_column, args.label_column], name=label)
    model, processor = _load_model(args, image_only=True)
    result = evaluate_robustness(
        model,
        processor,
        datasets,
        reference=labels[0],
        image_column=args.image_column,
        label_column=args.label_column,
        classnames=classnames,
        templates=args.templates,
        restrict_to_present_classes=args.restrict,
        **_run_kwargs(args),
    )
    result.config["split"] = args.split
    return result


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation selected by ``add_eval_parser`` and write ``<task>_<dataset>.{json,md,png}``."""
    eval_func = getattr(args, "eval_func", None)
    if eval_func is None:
        raise SystemExit(
            "hf-clip eval: choose an evaluation (zero-shot, linear-probe, retrieval, robustness)."
        )
    result = eval_func(args)
    if args.max_samples is not None:  # a cut of the split, not the whole: model cards must say so
        result.config["max_samples"] = args.max_samples
    paths = save_result(result, args.output_dir)
    summary = ", ".join(f"{k}={100 * v:.2f}%" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"{result.task} on {result.dataset}: {summary}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0
