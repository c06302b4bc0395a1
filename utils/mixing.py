"""MixUp / CutMix on the device batch (--mixup-alpha, --cutmix-alpha), as torchvision's classification
reference applies them: one of the two per batch (v2.RandomChoice), targets become class probabilities
(CrossEntropyLoss, label smoothing included, takes them as they are).

The reference draws from the global RNG, so a resumed run would draw differently. Here the draws of
batch `it` of `epoch` on `rank` come from torch's CPU generator seeded from (seed, epoch, it, rank)
inside fork_rng: a resume draws what the uninterrupted run drew, and no other RNG moves.
"""
import torch
from torchvision.transforms import v2

from . import UserError
from .inputs.data import sample_seed


class BatchMix:
    """mix(images, target, epoch, it) -> (mixed images, probability targets [B, num_classes])."""

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0, seed=0, rank=0):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.transform = v2.RandomChoice(choices)
        self.seed = sample_seed(seed, 0, rank)  # each rank's batches get their own draws

    def seed_of(self, epoch, it):
        return sample_seed(self.seed, epoch, it)

    def __call__(self, images, target, epoch, it):
        with torch.random.fork_rng(devices=[]):  # v2.MixUp/CutMix/RandomChoice draw on the CPU generator
            torch.default_generator.manual_seed(self.seed_of(epoch, it))
            return self.transform(images, target)


def batch_mix(args, num_classes, seed, rank=0):
    """The run's BatchMix, or None when both alphas are 0 (or the script has no such flags);
    refuses mixing with fewer than 2 classes."""
    mixup, cutmix = getattr(args, "mixup_alpha", 0.0), getattr(args, "cutmix_alpha", 0.0)
    if mixup == 0 and cutmix == 0:
        return None
    if num_classes < 2:
        flag = "--mixup-alpha" if mixup > 0 else "--cutmix-alpha"
        raise UserError(f"{flag} mixes the targets of two classes, but the data has {num_classes} class")
    return BatchMix(num_classes, mixup, cutmix, seed, rank)
