"""Contrastive language-image pretraining (Radford et al., 2021) with accelerate.

    accelerate launch examples/pretrain.py                       # tiny CLIP on the built-in synthetic data
    accelerate launch --num_processes 8 --mixed_precision bf16 examples/pretrain.py \
        --dataset my_org/captions --model ViT-B/32 --per_device_train_batch_size 256 --max_steps 100000
    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/pretrain.py ...
    accelerate launch examples/pretrain.py --model out/b32 --lock_image --dataset my_org/captions ...  # LiT

Every option: `python examples/pretrain.py --help`. The machinery lives in `hf_clip.training`.
"""

from accelerate import PartialState
from transformers import HfArgumentParser

from hf_clip.training import PretrainArguments, run_pretraining


def main() -> None:
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses()
    metrics = run_pretraining(args)
    if metrics and PartialState().is_main_process:
        width = max(len(k) for k in metrics)
        print("\nHeld-out evaluation:")
        for name, value in metrics.items():
            print(f"  {name:<{width}}  {value:.3f}")


if __name__ == "__main__":
    main()
