"""Device choice: auto | cpu | cuda | cuda:N | mps."""

from __future__ import annotations

from .errors import InputError

CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto"):
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}' was asked for but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError("device 'mps' was asked for but Apple Metal is not available; use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device '{name}'; choose one of {', '.join(CHOICES)}")


def amp_enabled(device) -> bool:
    """Mixed precision is used on CUDA only (CPU autocast is slower for 3-D convolutions)."""
    return getattr(device, "type", str(device)) == "cuda"
