"""The one place that turns a ``--device`` string into a torch device."""

from __future__ import annotations

from ex4d.errors import InputError


def resolve_device(name=None):
    """``"auto"``/None -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device -> checked.

    Raises InputError for an unknown name, or for CUDA when it is not available.
    """
    import torch

    if isinstance(name, torch.device):
        device = name
    elif name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise InputError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    return device
