"""Inference helpers shared by the tasks."""

import torch

from deepsegrecon.inference import label_argmax


def test_label_argmax_matches_torch_argmax_ties_included():
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 4, (5, 6, 7, 3, 8), generator=g).float()  # many ties: the first channel wins, as in torch
    for dim in (0, 1, 3):
        lab = label_argmax(p, dim)
        assert lab.dtype == torch.uint8 and torch.equal(lab, p.argmax(dim).to(torch.uint8))
