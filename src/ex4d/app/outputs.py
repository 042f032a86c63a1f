"""What a run leaves for the person: its settings file, the visibility warning, and the command lines
that give the same result. No gradio here.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

#: Below this fraction of pixels seen by the source camera a preview frame earns a warning.
LOW_VISIBLE_FRACTION = 0.3


def write_settings(folder: Path, settings: dict) -> Path:
    """``settings.json`` of a run: what the app ran, with the command lines (atomic, in the ledger)."""
    from ex4d.io.files import atomic_path

    path = folder / "settings.json"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return path


def visibility_warning(visible: list[float], threshold: float = LOW_VISIBLE_FRACTION) -> str:
    """A one-line warning when some frame keeps less than ``threshold`` of its pixels visible, else ""."""
    if not visible:
        return ""
    worst = int(np.argmin(visible))
    if visible[worst] >= threshold:
        return ""
    return (f"warning: little of the scene stays visible along this path: at frame {worst} only "
            f"{100 * visible[worst]:.1f}% of the view was seen by the source camera (the rest must be "
            f"generated); a smaller angle or a shorter move keeps more")


def _q(path) -> str:
    return shlex.quote(str(path))


#: Where the command lines shown on the page write (relative to where the user runs them), so that
#: running them never touches the app's own run folders.
CLI_OUTPUT_ROOT = Path("ex4d_out")


def cli_folder(run_folder: Path) -> Path:
    """The output folder the shown command lines use for a run: ``ex4d_out/<run folder's name>``."""
    return CLI_OUTPUT_ROOT / Path(run_folder).name


def recon_command(video: Path, depth: Path, path_file: Path, num_frames: int, resize: str, out: Path) -> str:
    """The ``ex4d recon`` line that renders the same colour and mask as the app's preview."""
    return (f"ex4d recon {_q(video)} --depth {_q(depth)} --cam {_q(path_file)} --num-frames {num_frames} "
            f"--resize {resize} -o {_q(out)}")


def generate_command(color: Path, mask: Path, output: Path, options) -> str:
    """The ``ex4d generate`` line with the same settings (only those that differ from its defaults)."""
    parts = [f"ex4d generate --color {_q(color)} --mask {_q(mask)} -o {_q(output)}"]
    # Steps, CFG and shift are compared with the chosen preset's own values (--preset fast alone gives 4 steps).
    defaults, preset_defaults = type(options)(), type(options)(preset=options.preset)
    if options.preset != defaults.preset:
        parts.append(f"--preset {_q(options.preset)}")
    flags = {"seed": "--seed", "steps": "--steps", "cfg": "--cfg", "shift": "--shift",
             "size": "--size", "models_dir": "--models-dir", "adapter": "--adapter", "vram_budget": "--vram-budget",
             "prompt": "--prompt", "negative_prompt": "--negative-prompt", "device": "--device",
             "attention": "--attention"}
    for key, flag in flags.items():
        value = getattr(options, key, None)
        if value is not None and value != getattr(preset_defaults, key, None):
            parts.append(f"{flag} {_q(value)}")
    parts += [f"--lora {_q(lora_arg(spec))}" for spec in options.loras]
    switches = {"low_vram": "--low-vram", "cpu_offload": "--cpu-offload", "fp8": "--fp8", "compile": "--compile"}
    parts += [flag for key, flag in switches.items() if getattr(options, key, False)]
    if not options.erode:
        parts.append("--no-erode")
    return " ".join(parts)


def lora_arg(spec) -> str:
    """``FILE[:STRENGTH]`` for a :class:`~ex4d.diffusion.weights.lora.LoraSpec`, as ``--lora`` reads it back:
    the strength is left out when it is 1, unless the path itself ends in ``:<number>`` (which would be
    read as a strength)."""
    from ex4d.diffusion.weights.lora import LoraSpec, parse_lora_spec

    if spec.strength == 1.0 and parse_lora_spec(spec.path) == LoraSpec(spec.path, 1.0):
        return spec.path
    return f"{spec.path}:{spec.strength:g}"


def lora_labels(specs) -> list[str]:
    """What the page shows for each launch LoRA: ``<file name> (strength S)``, one label per LoRA (a
    ``#N`` is added where two would read the same). The page sends these labels back, never a path."""
    labels = [f"{Path(spec.path).name} (strength {spec.strength:g})" for spec in specs]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


#: How to start the app with a LoRA (the page shows it when none was given at launch).
LORA_LAUNCH_HINT = "ex4d app --lora distill.safetensors"


def fast_preset_warning(preset: str, selected: int, offered: int) -> str:
    """A one-line warning when the ``fast`` sampler preset would run without any extra LoRA, else "".

    ``selected``: LoRAs ticked for this generation; ``offered``: LoRAs given at launch. Not an error:
    the generation still runs (the base model at 4 steps), as ``ex4d generate --preset fast`` does."""
    if str(preset).strip().lower() != "fast" or selected:
        return ""
    how = (f"tick one under Extra LoRAs, or start the app with `{LORA_LAUNCH_HINT}`" if offered
           else f"start the app with `{LORA_LAUNCH_HINT}` (FILE[:STRENGTH], repeatable) and tick it here")
    return (f"warning: the fast preset (4 steps, no CFG) is meant for a step-distillation LoRA, and none is "
            f"selected: generation still runs, but as the base model at 4 steps, which is not what the preset "
            f"is for. To add one, {how}.")


def eval_command(video: Path, camera: Path, color: Path, mask: Path, out: Path) -> str:
    """The ``ex4d eval`` line that writes the same report."""
    return f"ex4d eval {_q(video)} --camera {_q(camera)} --condition {_q(color)} --mask {_q(mask)} -o {_q(out)}"
