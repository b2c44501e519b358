"""Augmentation: seeded, the right shape and scale, and each transform does what it says."""
import torch

from foldmerge.data import Task
from foldmerge.data.augment import _blur, expand


def test_expand_is_seeded_and_keeps_the_normalization():
    task = Task.parse("mnist:0-4")
    orig = task.sample(16, seed=0)
    a = expand(task, orig, 200, seed=1)
    b = expand(task, orig, 200, seed=1)
    c = expand(task, orig, 200, seed=2)
    assert a.shape == (200, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = orig.min(), orig.max()                  # pixel 0 and pixel 1 in normalized units
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5
    assert expand(task, orig, 0).shape == (0, 1, 28, 28)


def test_augmented_images_differ_from_but_resemble_the_originals():
    task = Task.parse("fmnist:0-4")
    orig = task.sample(8, seed=0)
    aug = expand(task, orig, 64, seed=0, mixup_p=0.0)
    # each augmented image is closer to some original than the originals are to each other on average
    d = torch.cdist(aug.flatten(1), orig.flatten(1)).min(1).values
    pair = torch.cdist(orig.flatten(1), orig.flatten(1))
    assert (d > 0).all() and d.mean() < pair[pair > 0].mean()


def test_blur_preserves_constants_and_smooths():
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(_blur(flat, 1.0), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    out = _blur(spike, 1.0)
    assert out[0, 0, 4, 4] < 1.0 and abs(out.sum().item() - 1.0) < 1e-5
