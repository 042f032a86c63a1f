"""One check, before any work, of every weight file a command will need.

Each stage knows its own downloads (:func:`ex4d.depth.weights.missing_depth_weights`,
:func:`ex4d.diffusion.weights.models_dir.missing_wan` / :func:`~ex4d.diffusion.weights.models_dir.missing_adapter`);
this module asks all the stages a command runs and raises one :class:`MissingWeightsError` (exit 2)
listing every missing file with its download command and size, instead of failing on the first
one after minutes of work (and on the next one in the next run). Nothing here touches the network
except, when only automatically downloadable weights are missing, one quick probe of the Hub.

Called by the commands (``depth``, ``recon``, ``run``, ``generate`` through
:func:`ex4d.pipeline.load_generator`, ``make-pairs``, ``train``, ``batch``); usable from Python::

    from ex4d.weights_preflight import check_weights
    check_weights(depth="depthcrafter", generation=True, models_dir="models")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

from ex4d.errors import MissingWeightsError
from ex4d.weights_common import MissingWeight, format_gb, hub_unreachable

log = logging.getLogger(__name__)

#: Where the messages suggest downloading to when no --models-dir was given.
SUGGESTED_MODELS_DIR = "models"


def _is_depth_file(spec: str) -> bool:
    return Path(str(spec)).suffix.lower() in (".npz", ".npy")


def depth_reusable(depth_cache: str | os.PathLike | None, estimator: str, video: str | os.PathLike | None) -> bool:
    """True if ``depth_cache`` (an output folder's ``depth.npz``) was made by ``estimator`` from
    ``video``, so the run will most likely reuse it and not need the estimator's weights. (Frame
    count and size are checked only when the depth stage runs; if the file turns out stale, the
    estimator's own load reports its missing weights then.)"""
    if depth_cache is None or not Path(depth_cache).is_file():
        return False
    try:
        import numpy as np

        with np.load(depth_cache, allow_pickle=False) as data:
            request = json.loads(str(data["settings"])).get("request") or {}
        if request.get("estimator") != estimator:
            return False
        return video is None or request.get("source", {}).get("path") == str(Path(video).resolve())
    except Exception:  # unreadable: the depth stage recomputes, so the weights are needed
        return False


def missing_weights(*, depth: str | None = None, generation: bool = False, wan: bool = False,
                    adapter: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                    layout: str = "auto", depth_variant: str = "small",
                    depth_cache: str | os.PathLike | None = None,
                    video: str | os.PathLike | None = None) -> list[MissingWeight]:
    """Every download that a command with these needs lacks on this machine (no network).

    depth: the depth estimator name (``depthcrafter``, ``depth-anything``, ``vda``, ``vda-metric``, ...: one
    of :data:`ex4d.depth.ESTIMATORS`), or a depth file / None
    for no estimator. generation: Wan2.1-I2V + the EX-4D adapter (``adapter`` or found in
    ``models_dir``). wan: Wan2.1-I2V alone (training), plus ``adapter`` if one is given.
    depth_cache / video: an existing ``depth.npz`` that the run would reuse (see :func:`depth_reusable`).
    """
    from ex4d.depth.weights import missing_depth_weights

    items: list[MissingWeight] = []
    if depth and not _is_depth_file(depth) and not depth_reusable(depth_cache, depth, video):
        items += missing_depth_weights(depth, models_dir, variant=depth_variant, suggest_dir=SUGGESTED_MODELS_DIR)
    if generation or wan or adapter is not None:
        from ex4d.diffusion.weights.models_dir import missing_adapter, missing_wan

        if generation or wan:
            items += missing_wan(models_dir, layout)
        if generation or adapter is not None:
            items += missing_adapter(models_dir, adapter)
    return items


def missing_message(items: list[MissingWeight], *, unreachable: str | None = None,
                    models_dir_given: bool = True) -> str:
    """The one-line error for ``items``: each download with what is missing, its command and size."""
    total = sum(item.size_gb for item in items)
    parts = [f"({i}) {item.describe()}" for i, item in enumerate(items, 1)]
    tail = []
    if unreachable and any(item.auto for item in items):
        tail.append(f"nothing could be downloaded automatically: the Hugging Face Hub is unreachable ({unreachable})")
    if not models_dir_given:
        tail.append(f"after downloading, pass --models-dir {SUGGESTED_MODELS_DIR}")
    tail.append("then rerun (docs/models.md, docs/depth.md)")
    count = f"{len(items)} download{'s' if len(items) != 1 else ''}"
    return (f"missing weights, nothing was run: {count}, about {format_gb(total)} in all: " + "; ".join(parts)
            + "; " + "; ".join(tail))


def raise_if_missing(items: list[MissingWeight], *, models_dir_given: bool = True) -> None:
    """Raise one :class:`MissingWeightsError` for ``items``, unless every one of them is downloaded
    by its stage on its own and the Hub answers (then the download happens when the stage runs)."""
    items = _dedupe(items)
    if not items:
        return
    unreachable = hub_unreachable() if any(item.auto for item in items) else None
    if all(item.auto for item in items) and unreachable is None:
        log.info("weights to download when their stage runs: %s", ", ".join(item.repo for item in items))
        return
    raise MissingWeightsError(missing_message(items, unreachable=unreachable, models_dir_given=models_dir_given))


def check_weights(*, depth: str | None = None, generation: bool = False, wan: bool = False,
                  adapter: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                  layout: str = "auto", depth_variant: str = "small", depth_cache: str | os.PathLike | None = None,
                  video: str | os.PathLike | None = None) -> None:
    """Raise :class:`MissingWeightsError` (exit 2) listing every missing download (see :func:`missing_weights`)."""
    items = missing_weights(depth=depth, generation=generation, wan=wan, adapter=adapter, models_dir=models_dir,
                            layout=layout, depth_variant=depth_variant, depth_cache=depth_cache, video=video)
    raise_if_missing(items, models_dir_given=models_dir is not None)


def check_command_weights(args, *, generation: bool = False, wan: bool = False) -> None:
    """:func:`check_weights` for a command's parsed arguments (the names the commands share:
    ``depth``, ``models_dir``, ``adapter``, ``layout``, ``output``, ``video``, ``no_reuse``)."""
    depth = getattr(args, "depth", None)
    output = getattr(args, "output", None)
    reuse = output is not None and not getattr(args, "no_reuse", False) and getattr(args, "video", None) is not None
    check_weights(depth=depth if isinstance(depth, str) else None, generation=generation, wan=wan,
                  adapter=getattr(args, "adapter", None), models_dir=getattr(args, "models_dir", None),
                  layout=getattr(args, "layout", "auto") or "auto",
                  depth_cache=Path(output) / "depth.npz" if reuse else None, video=getattr(args, "video", None))


def check_pairs_weights(depth: str, inputs: Iterable, models_dir: str | os.PathLike | None = None) -> None:
    """:func:`check_weights` for ``make-pairs``: the estimator's weights, unless ``depth`` is a folder of
    depth files or every input (:class:`ex4d.train.pairs.ClipInput`) brings its own depth file."""
    if Path(str(depth)).is_dir() or all(getattr(clip, "depth", None) is not None for clip in inputs):
        return
    check_weights(depth=depth, models_dir=models_dir)


def check_jobs_weights(jobs: Iterable[dict]) -> None:
    """:func:`check_weights` for every job of a batch at once (jobs as :func:`ex4d.batch.load_jobs` gives them)."""
    items: list[MissingWeight] = []
    given = True
    for job in jobs:
        stage = job.get("stage", "run")
        output = job.get("output")
        items += missing_weights(
            depth=job.get("depth", "depthcrafter"), generation=stage == "run",
            adapter=job.get("adapter") if stage == "run" else None,
            models_dir=job.get("models_dir"), depth_cache=Path(output) / "depth.npz" if output else None,
            video=job.get("video"))
        given = given and job.get("models_dir") is not None
    raise_if_missing(items, models_dir_given=given)


def _dedupe(items: list[MissingWeight]) -> list[MissingWeight]:
    seen, out = set(), []
    for item in items:
        key = (item.repo, tuple(item.paths))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
