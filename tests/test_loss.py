import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_clip.training import ClipLoss, SigLipLoss

REPO = Path(__file__).resolve().parents[1]


def _embeds(batch: int = 10, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def _loss_and_grads(loss_fn, image, text, *scalars):
    leaves = [t.clone().requires_grad_() for t in (image, text, *scalars)]
    loss = loss_fn(leaves[0], leaves[1], leaves[2].exp(), *leaves[3:])
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def test_clip_loss_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = _embeds()
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    loss, grads = _loss_and_grads(ClipLoss(), image, text, log_scale)
    ref_loss, ref_grads = _loss_and_grads(open_clip_loss.ClipLoss(), image, text, log_scale)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_siglip_loss_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = _embeds(seed=1)
    log_scale, bias = (
        torch.tensor(math.log(10.0), dtype=torch.float64),
        torch.tensor(-10.0, dtype=torch.float64),
    )
    loss, grads = _loss_and_grads(SigLipLoss(), image, text, log_scale, bias)
    ref_loss, ref_grads = _loss_and_grads(open_clip_loss.SigLipLoss(), image, text, log_scale, bias)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_clip_loss_rewards_alignment():
    image, text = _embeds(batch=8, dim=32)
    loss_fn = ClipLoss()
    assert loss_fn(image, image, 100.0) < 1e-3  # perfectly matched pairs, near-orthogonal negatives
    assert loss_fn(image, text, 100.0) > 1.0


def test_labels_are_cached_until_the_batch_changes():
    loss_fn = ClipLoss()
    image, text = _embeds(batch=6)
    loss_fn(image, text, 10.0)
    first = loss_fn._labels
    loss_fn(*_embeds(batch=6, seed=3), 10.0)
    assert loss_fn._labels is first
    loss_fn(image[:4], text[:4], 10.0)
    assert loss_fn._labels is not first and loss_fn._labels.tolist() == [0, 1, 2, 3]


def test_mismatched_embeddings_are_rejected():
    image, text = _embeds()
    with pytest.raises(ValueError, match="one text per image"):
        ClipLoss()(image, text[:5], 10.0)
    with pytest.raises(ValueError, match="shape"):
        SigLipLoss()(image[0], text[0], 10.0, 0.0)


def test_distributed_loss_equals_single_process_loss():
    """2 gloo processes on CPU: losses and gradients match one process on the global batch (1e-6)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(REPO / "tests" / "dist_loss_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ALL CHECKS PASSED" in result.stdout
