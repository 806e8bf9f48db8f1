from .accumulation import average_gradients, contrastive_accumulation_step
from .distributed import gather_with_grad
from .locking import TowerLock, count_parameters, lock_image_tower, lock_text_tower
from .loss import ClipLoss, SigLipLoss
from .optim import (
    ClampLogitScaleCallback,
    clamp_logit_scale,
    cosine_schedule_with_warmup,
    create_optimizer,
    param_groups,
    weight_decay_split,
)
from .pretraining import PretrainArguments, run_pretraining
from .wise_ft import wise_ft

__all__ = [
    "ClampLogitScaleCallback",
    "ClipLoss",
    "PretrainArguments",
    "SigLipLoss",
    "TowerLock",
    "average_gradients",
    "clamp_logit_scale",
    "contrastive_accumulation_step",
    "count_parameters",
    "cosine_schedule_with_warmup",
    "create_optimizer",
    "gather_with_grad",
    "lock_image_tower",
    "lock_text_tower",
    "param_groups",
    "run_pretraining",
    "weight_decay_split",
    "wise_ft",
]
