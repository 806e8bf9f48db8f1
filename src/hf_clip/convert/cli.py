"""`hf-clip convert SRC OUT_DIR`: the command-line face of `convert_checkpoint`."""

from __future__ import annotations

import argparse

__all__ = ["add_convert_parser", "run_convert"]

_DESCRIPTION = """\
Convert a CLIP checkpoint into a complete hf_clip model directory (config.json, model.safetensors,
tokenizer and image processor). SRC is an OpenAI TorchScript archive (RN50.pt, ViT-B-32.pt, ... read
without executing it), an OpenAI / open_clip state dict (.pt, .bin, .safetensors), a transformers
CLIPModel directory or an hf_clip directory, local or a Hub repository id (openai/clip-vit-base-patch32,
laion/CLIP-ViT-H-14-laion2B-s32B-b79K; only the files of one copy of the weights are downloaded, safetensors
first). With --to transformers, an hf_clip (or any ViT) source is
written as a transformers CLIPModel directory instead; with --to open_clip, as an open_clip folder
(open_clip_config.json + open_clip_model.safetensors) for open_clip.create_model_and_transforms("local-dir:OUT")
or, once uploaded, "hf-hub:org/name". open_clip tokenizes with OpenAI's BPE, so models with another vocabulary
(one trained by examples/pretrain.py) are refused; the image processor becomes its preprocess_cfg (refused
where open_clip cannot reproduce it; --no-processor writes open_clip's defaults, OpenAI's).

An open_clip Hub folder (open_clip_config.json + open_clip_model.safetensors), or a weights file with
open_clip_config.json beside it, takes its activation, heads and end-of-text id from that file, and variants
hf_clip does not compute (other pooling, no causal mask...) are refused.

Other OpenAI / open_clip files record neither their activation nor their head counts. Tower sizes that are a
preset's take its heads and activation (LAION's ViT-H/g/bigG: 16 heads, exact GELU, at any image or patch
size); otherwise heads are width / 64 and QuickGELU (that of OpenAI's released weights) is assumed. --gelu or
--quick-gelu overrides the activation (DFN's ViT-H-14-378 uses QuickGELU); --config names the architecture
where neither holds."""


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `convert` sub-command on an `argparse` sub-parsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert OpenAI / open_clip / transformers CLIP checkpoints to hf_clip (or to transformers / open_clip)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src",
        help="checkpoint file or model directory to convert, or a Hub repository id (openai/clip-vit-base-patch32)",
    )
    parser.add_argument("out_dir", help="directory to write (must be new or empty unless --overwrite)")
    parser.add_argument(
        "--to", choices=("hf_clip", "transformers", "open_clip"), default="hf_clip", help="output format"
    )
    parser.add_argument(
        "--bpe-vocab", default=None, help="OpenAI BPE file (default: the copy shipped with open_clip)"
    )
    activation = parser.add_mutually_exclusive_group()
    activation.add_argument(
        "--gelu", dest="activation", action="store_const", const="gelu", help="the model uses exact GELU"
    )
    activation.add_argument(
        "--quick-gelu",
        dest="activation",
        action="store_const",
        const="quick_gelu",
        help="the model uses QuickGELU (default for OpenAI / open_clip files)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repository SRC")
    parser.add_argument(
        "--config",
        default=None,
        help="preset name (e.g. ViT-H-14), or an hf_clip or transformers config.json (or its folder), for weights "
        "files whose heads are not width/64",
    )
    parser.add_argument(
        "--no-processor",
        dest="processor",
        action="store_false",
        help="write weights and config only (needed for vocabularies other than OpenAI's BPE)",
    )
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion described by parsed arguments; returns the process exit code."""
    from ..cli import USER_ERRORS, report_error
    from .api import convert_checkpoint

    try:
        out = convert_checkpoint(
            args.src,
            args.out_dir,
            to=args.to,
            bpe_vocab=args.bpe_vocab,
            activation=args.activation,
            overwrite=args.overwrite,
            processor=args.processor,
            config=args.config,
            revision=args.revision,
        )
    except USER_ERRORS as error:  # ConversionError is a ValueError
        return report_error("convert", error)
    print(f"Wrote {args.to} model to {out}")
    if args.to == "open_clip":
        print(f"Load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0
