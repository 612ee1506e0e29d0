"""Choosing the torch device."""

#: ``--device`` choices and the default (``auto``: CUDA when usable, else the CPU).
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def resolve_device(requested=DEFAULT_DEVICE):
    """``auto`` -> ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device (try --device auto)")
    return requested
