"""``hf-clip eval bias``: the paper's bias probes on a FairFace-style dataset from the command line.

``add_bias_parser(eval_subparsers)`` adds the ``bias`` subcommand (sharing the model, run and data flags of
the other evaluations) and stores ``run_bias`` in ``args.func``; ``run_bias(args)`` runs the probes and
writes ``bias_<dataset>[_<split>].json``, ``.md`` and one PNG per probe into ``--output-dir`` (the split
is named when it is not 'test', as for every evaluation).
"""

from __future__ import annotations

import argparse
from typing import Any

from .bias import (
    DEFAULT_PROBES,
    PROBES,
    BiasProbeConfig,
    check_bias_columns,
    run_bias_probes,
    write_bias_report,
)
from .cli import _common_parser, _data_parser, _dataset_name, _flag, _load, _load_model, _run_kwargs
from .reporting import result_stem


def add_bias_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bias",
        parents=[_common_parser(), _data_parser(label=False)],
        help="Bias probes of the paper (FairFace classification, denigration probe, child ablation, identity).",
        description="Run the bias probes of Radford et al. (2021, section 7) on an annotated dataset you supply: "
        "an image column and FairFace-style race, gender and age columns (ClassLabel or strings). Label sets "
        "and prompts come from --config (JSON with BiasProbeConfig fields).",
    )
    parser.add_argument(
        "--split",
        default="validation",
        help="Split to probe (default: validation, FairFace's held-out split; the other evaluations default "
        "to test).",
    )
    parser.add_argument(
        "--probes",
        nargs="+",
        choices=PROBES,
        default=list(DEFAULT_PROBES),
        help="demographic: zero-shot race/gender/age accuracy per group; denigration: shares classified as "
        "crime-related or non-human; child: the denigration probe with a 'child' label added; identity: "
        "zero-shot identification among N names (needs --identity-column).",
    )
    parser.add_argument(*_flag("race_column"), dest="race_column", default="race")
    parser.add_argument(*_flag("gender_column"), dest="gender_column", default="gender")
    parser.add_argument(*_flag("age_column"), dest="age_column", default="age")
    parser.add_argument(*_flag("identity_column"), dest="identity_column", default=None)
    parser.add_argument(
        "--config", default=None, help="JSON file overriding label sets, prompts and confidence."
    )
    parser.set_defaults(func=run_bias)
    return parser


def run_bias(args: argparse.Namespace) -> dict[str, Any]:
    config = BiasProbeConfig.from_json(args.config) if args.config else BiasProbeConfig()
    dataset = _load(args, args.dataset, args.split)
    check_bias_columns(  # before the model loads
        dataset,
        args.probes,
        args.image_column,
        args.race_column,
        args.gender_column,
        args.age_column,
        args.identity_column,
    )
    model, processor = _load_model(args)
    name = _dataset_name(args.dataset)
    results = run_bias_probes(
        model,
        processor,
        dataset,
        config=config,
        probes=args.probes,
        image_column=args.image_column,
        race_column=args.race_column,
        gender_column=args.gender_column,
        age_column=args.age_column,
        identity_column=args.identity_column,
        dataset_name=name,
        **_run_kwargs(args),
    )
    results["split"] = args.split
    if args.max_samples is not None:
        results["max_samples"] = args.max_samples
    stem = result_stem("bias", name, args.split)  # named like every evaluation's files
    paths = write_bias_report(results, args.output_dir, stem=stem)
    summary = ", ".join(f"{k}={100 * v:.1f}%" for k, v in results["metrics"].items())
    print(f"bias probes on {name}: {summary}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return results


__all__ = ["add_bias_parser", "run_bias"]
