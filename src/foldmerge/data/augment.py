"""Expanding a few unlabeled images per task by augmentation (FS-Merge paper, appendix E.2).

Each augmented image starts from a random original of the task's merge sample and gets, in
order: a random crop (pad by `pad` pixels, crop back to size), a horizontal flip with
probability ½ where that keeps the task meaningful (clothes yes, digits no), one of
{grayscale, solarize, Gaussian blur} (grayscale is the identity on one-channel images, so for
MNIST it means "left as is"), and with probability `mixup_p` MixUp with another augmented
image of the same task (λ ~ Beta(α, α)). The paper saves the features of these images once
and reuses them for every method; `expand` is seeded so every method sees the same images.
Work happens in pixel space [0, 1]; inputs and outputs are normalized like the task's splits.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .tasks import Task, _normalizer

FLIP_OK = {"fmnist"}          # horizontal flips keep the label of clothes, not of digits


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def expand(task: Task | str, originals: torch.Tensor, count: int, seed: int = 0, pad: int = 2,
           mixup_p: float = 0.5, mixup_alpha: float = 0.4) -> torch.Tensor:
    """`count` augmented images made from `originals` (normalized, N x C x H x W)."""
    task = Task.parse(task)
    if count and task.is_text:
        raise ValueError(f"augmentation makes images; {task} is a text task (use augment 0)")
    if count < 0:
        raise ValueError("the number of augmented images must be >= 0")
    if count == 0:
        return originals[:0].clone()
    if len(originals) == 0:
        raise ValueError("augmentation needs at least one original image")
    g = torch.Generator().manual_seed(int(seed))
    mean, std = _normalizer(task.dataset)
    src = (originals * std + mean).clamp(0, 1)
    n, c, h, w = src.shape
    pick = torch.randint(n, (count,), generator=g)
    x = F.pad(src[pick], (pad, pad, pad, pad))
    dy = torch.randint(2 * pad + 1, (count,), generator=g)
    dx = torch.randint(2 * pad + 1, (count,), generator=g)
    x = torch.stack([x[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(count)])
    if task.dataset in FLIP_OK and task.view not in ("rot90", "rot270", "transpose"):
        flip = torch.rand(count, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
    which = torch.randint(3, (count,), generator=g)          # 0 grayscale, 1 solarize, 2 blur
    if c == 3:
        gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        x = torch.where((which == 0).view(-1, 1, 1, 1), gray, x)
    sol = which == 1
    x[sol] = torch.where(x[sol] >= 0.5, 1.0 - x[sol], x[sol])
    blur = which == 2
    if blur.any():
        sigmas = 0.5 + torch.rand(int(blur.sum()), generator=g) * 1.0
        x[blur] = torch.cat([_blur(x[blur][i:i + 1], float(s)) for i, s in enumerate(sigmas)])
    mix = torch.rand(count, generator=g) < mixup_p
    if mix.any():
        partner = torch.randint(count, (count,), generator=g)
        lam = _beta(g, count, mixup_alpha, x.dtype)
        mixed = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[partner]
        x = torch.where(mix.view(-1, 1, 1, 1), mixed, x)
    return ((x - mean) / std).to(originals.dtype)


def _beta(g: torch.Generator, count: int, alpha: float, dtype) -> torch.Tensor:
    """Beta(α, α) samples as a ratio of Gamma(α) draws. torch's Gamma sampler takes no
    generator, so it runs on the global RNG seeded from `g`, which is restored afterwards."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(torch.randint(2 ** 31 - 1, (1,), generator=g)))
        a = torch.distributions.Gamma(alpha, 1.0).sample((count,))
        b = torch.distributions.Gamma(alpha, 1.0).sample((count,))
    finally:
        torch.random.set_rng_state(state)
    return (a / (a + b)).to(dtype)
