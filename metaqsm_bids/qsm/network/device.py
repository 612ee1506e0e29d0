"""Choosing the torch device."""


def resolve_device(requested="auto"):
    """``auto`` -> ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device (try --device auto)")
    return requested
