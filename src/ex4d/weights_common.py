"""What every stage's weight loading shares: the Hub's reachability, missing downloads, tensor checks.

Used by the stages that fetch and load weights (:mod:`ex4d.depth.weights`, :mod:`ex4d.diffusion.weights.models_dir`,
:mod:`ex4d.diffusion.weights.wan`, :mod:`ex4d.diffusion.weights.adapter`) and by the preflight that
checks every weight a command needs (:mod:`ex4d.weights_preflight`). No stage imports another.

* :func:`hub_unreachable` tells, in about a second and once per process, whether downloads can
  work: ``HF_HUB_OFFLINE=1``, or no answer from the endpoint (``HF_ENDPOINT``, default
  https://huggingface.co). huggingface_hub itself would retry each request five times with
  back-off (about 23 s and a dozen "Retrying in 8s" lines per file); the loaders ask this first and
  never send a request to a Hub that is not there.
* :class:`MissingWeight` is one missing download: what, where, the command and its size.
* :func:`check_tensor_values`: integer/bool weights and NaN/inf values are errors naming the tensor.
* :func:`first_line`: an exception's message as one line, also when it is empty.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from ex4d.errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
#: Seconds the reachability probe waits for an answer.
PROBE_TIMEOUT_S = 3.0

_PROBED: dict[str, str | None] = {}  # endpoint -> reason it is unreachable (None: reachable)


def offline_env() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    """The Hub address downloads would use (``HF_ENDPOINT``, read now, not at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _probe(url: str, timeout: float) -> str | None:
    """None if something answers HTTP at ``url`` (any status), else why not (one short phrase)."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ex4d-hub-probe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:  # an HTTP answer, even 4xx/5xx, means the Hub is there
        return None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        return f"{text}".strip() or type(reason).__name__
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:  # bad URL, reset connection, ...
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why downloads cannot work now (one phrase), or None when the Hub answers.

    ``HF_HUB_OFFLINE=1`` answers at once; otherwise one HEAD request with a short timeout, whose
    result is kept for the rest of the process (per endpoint), so a batch of clips asks once.
    """
    if offline_env():
        return "HF_HUB_OFFLINE is set"
    url = endpoint()
    if url not in _PROBED:
        reason = _probe(url, timeout)
        _PROBED[url] = None if reason is None else f"{url} cannot be reached: {reason}"
        if reason is not None:
            log.info("Hugging Face Hub unreachable (%s); no download will be tried", _PROBED[url])
    return _PROBED[url]


def forget_probe() -> None:
    """Forget the cached reachability answers (tests; a long-lived process after the network changed)."""
    _PROBED.clear()


@dataclass
class MissingWeight:
    """One download that a command needs and that is not on this machine.

    what: a name for people ("DepthCrafter UNet"). repo: the Hub repository. paths: the missing
    files or folders, as the loaders look for them. command: the exact download command. size_gb:
    approximate download size. auto: the stage would fetch it by itself when the Hub is reachable.
    note: anything else the user must do (e.g. accept a licence).
    """

    what: str
    repo: str
    paths: list[str]
    command: str
    size_gb: float
    auto: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        shown = ", ".join(self.paths[:3]) + (f" (+{len(self.paths) - 3} more)" if len(self.paths) > 3 else "")
        size = format_gb(self.size_gb)
        note = f" ({self.note})" if self.note else ""
        return f"{self.what}, about {size}: missing {shown}; download with: {self.command}{note}"


def format_gb(size_gb: float) -> str:
    """``3.05`` -> ``3.05 GB``, ``0.1`` -> ``0.1 GB``, ``87.2`` -> ``87 GB``; sizes here are approximate."""
    if size_gb < 10:
        return f"{size_gb:.3g} GB"
    return f"{size_gb:.0f} GB"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters; the type's
    name when the message is empty (``EOFError()`` from a 0-byte file has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def check_tensor_values(tensors, source, expected_dtypes: dict | None = None) -> None:
    """Raise :class:`CheckpointError` naming the first tensor that is not a finite floating-point one.

    tensors: ``{name: tensor}`` or ``(name, tensor)`` pairs. expected_dtypes: name -> the model's
    dtype; a non-float tensor is allowed where the model itself holds an integer/bool buffer.
    Integer or bool weights, NaN and inf are never what a trained model holds: a damaged or wrong file.
    """
    import torch

    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, tensor in items:
        if not tensor.is_floating_point():
            expected = (expected_dtypes or {}).get(name)
            if expected is not None and not expected.is_floating_point:
                continue
            raise CheckpointError(f"{source}: tensor {name} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                                  f"weights must be floating point (damaged or wrong file? download it again)")
        if tensor.device.type == "meta" or not tensor.numel():
            continue
        values = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor  # float8: no isfinite kernel
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                                  f"the file is damaged (download it again)")
