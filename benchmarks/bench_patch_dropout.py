"""FLIP-style patch dropout: step speed against held-out zero-shot accuracy on the built-in data.

Trains the same small ViT CLIP twice (or more) with identical seeds, data and steps, once per dropout
fraction, and prints samples/s and the held-out zero-shot top-1 of each, with ratios to no dropout.

    python benchmarks/bench_patch_dropout.py --steps 300 --fractions 0 0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hf_clip import HfClipConfig
from hf_clip.training import PretrainArguments, run_pretraining

VIT = {
    "projection_dim": 128,
    "text_config": {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
    },
    "vision_config": {"image_size": 64, "patch_size": 8, "hidden_size": 128, "num_hidden_layers": 3},
}


def run(fraction: float, steps: int, workdir: Path) -> dict[str, float]:
    config = workdir / "vit.json"
    HfClipConfig(**VIT).to_json_file(config)
    out = workdir / f"dropout_{fraction}"
    args = PretrainArguments(
        model=str(config),
        output_dir=str(out),
        max_steps=steps,
        patch_dropout=fraction,
        report_to="none",
        logging_steps=max(1, steps // 5),
    )
    metrics = run_pretraining(args)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    speed = sum(r["samples_per_s"] for r in log[1:]) / max(1, len(log) - 1)  # skip the warm-up window
    return {"patch_dropout": fraction, "samples_per_s": speed, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--output", default="benchmarks/results/patch_dropout.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(f, args.steps, Path(tmp)) for f in args.fractions]
    base = rows[0]
    print(
        f"\n{'dropout':>8} {'samples/s':>10} {'speed x':>8} "
        + " ".join(f"{k.split('/')[-1]:>11}" for k in base if "/" in k)
    )
    for row in rows:
        accs = " ".join(f"{row[k]:>11.3f}" for k in base if "/" in k)
        print(
            f"{row['patch_dropout']:>8.2f} {row['samples_per_s']:>10.1f} {row['samples_per_s'] / base['samples_per_s']:>8.2f} {accs}"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
