"""The training loss (ROI-aware Dice / Dice + CE) and the validation Dice."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class SegLoss(torch.nn.Module):
    """Dice or Dice + cross-entropy, leaving out voxels outside the reviewed ROI.

    Voxels with ``roi == 0`` get the label ``IGNORE_INDEX``: MONAI's :class:`~monai.losses.DiceLoss`
    (``ignore_index``) then zeroes both the prediction and the one-hot target there, so they add nothing to
    the intersection or the sums, and the cross-entropy skips them (``ignore_index``; its mean is over the
    reviewed voxels only). Where every voxel is reviewed this is exactly MONAI's ``DiceCELoss``
    (``to_onehot_y=True, softmax=True``). A patch with no reviewed voxel contributes nothing.
    """

    def __init__(self, kind: str = "dicece", include_background: bool = False):
        super().__init__()
        from monai.losses import DiceLoss

        self.kind = kind
        self.dice = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True,
                             ignore_index=IGNORE_INDEX)
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, label: torch.Tensor, roi: torch.Tensor | None = None):
        label = label.long()
        if roi is not None:
            label = torch.where(roi > 0, label, torch.full_like(label, IGNORE_INDEX))
        loss = self.dice(logits, label)
        if self.kind == "dicece":
            loss = loss + self.ce(logits, label[:, 0]) if (label != IGNORE_INDEX).any() else loss + 0.0 * logits.sum()
        return loss


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of each foreground class (MONAI ``DiceMetric``) for one case's class maps; NaN for a class
    absent from both. Class by class, on the bounding box of that class in either map, so memory stays
    small however many classes and voxels there are (no full-volume one-hot)."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    pred, label = pred.reshape(pred.shape[-3:]), label.reshape(label.shape[-3:])
    out = torch.full((num_classes - 1,), float("nan"), dtype=torch.float64)
    for c in range(1, num_classes):
        p, y = pred == c, label == c
        either = p | y
        if not either.any():
            continue
        box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in torch.nonzero(either).unbind(1))
        out[c - 1] = float(metric(p[box][None, None].float(), y[box][None, None].float())[0, 0])
    return out
