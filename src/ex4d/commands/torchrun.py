"""The torchrun entry of ``ex4d generate`` on several GPUs (the command-line half of
:mod:`ex4d.diffusion.parallel`, which holds the parallel engine and imports no command code).

``torchrun --nproc-per-node N -m ex4d.commands.torchrun <ex4d generate args>`` runs one generation
over N processes (same as ``ex4d generate --nproc-per-node N``); rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

from ex4d.diffusion.parallel import MODES, _quiet, apply_safe_env, init_parallel, launched_distributed, shutdown
from ex4d.errors import UserError


def add_parallel_arg(parser) -> None:
    """``--parallel`` for a generation command (see :func:`resolve_mode`)."""
    parser.add_argument("--parallel", default="auto", choices=MODES,
                        help="multi-GPU layout under torchrun: ulysses (split the video tokens), cfg (the two "
                             "guidance branches on 2 GPUs), cfg-ulysses (both, 4 or 8 GPUs), auto (cfg on 2, "
                             "cfg-ulysses on 4/8), none. Ignored without torchrun. docs/scale.md")


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def generate_main(args) -> int:
    """``ex4d generate`` on every rank of a torchrun launch: rank 0 writes the video.

    ``args`` are ``ex4d generate``'s parsed arguments plus ``parallel``. Each rank loads the whole
    model on cuda:LOCAL_RANK (Ulysses and CFG split the work, not the weights).

    A :class:`UserError` (a bad input, missing weights) is printed once, by rank 0, as the usual one
    line ``error: ...``, and the rank exits with its code (1, or 2 for weights) instead of a traceback
    per rank. With ``--debug`` it is raised. torchrun itself still reports that its workers failed.
    """
    try:
        return _generate_main(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        if _env_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


def _generate_main(args) -> int:
    from ex4d.commands.generate import options_from_args
    from ex4d.pipeline import check_generate_paths, run_generate

    options = options_from_args(args)
    if launched_distributed() and (options.low_vram or options.cpu_offload):
        raise UserError("--low-vram / --cpu-offload cannot be combined with multi-GPU generation (each rank "
                        "would stream its own copy of the weights); drop them or run one process")
    check_generate_paths(args.color, args.mask, args.output, options)  # before any process group exists
    ctx = init_parallel(getattr(args, "parallel", "auto"), guidance_scale=options.cfg)
    try:
        output = run_generate(args.color, args.mask, args.output, options, parallel=ctx)
        if ctx.is_main:
            print(f"wrote {output} ({ctx.mode} on {ctx.world_size} process(es))")
        if ctx.world_size > 1:
            dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    finally:
        shutdown(ctx)
    return 0


def argv_from_args(args, parser=None) -> list[str]:
    """The command line that parses back to ``args`` with :func:`build_parser` (for the worker processes).

    Every option whose value differs from its default is written out; ``--nproc-per-node`` is left
    out (the workers are the processes).
    """
    import argparse

    parser = parser or build_parser()
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc_per_node") or \
                isinstance(action, argparse._HelpAction):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default and not action.required:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._AppendAction):
            argv.extend(f"{flag}={item}" for item in value)  # --lora, once per file
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._StoreFalseAction):
            argv.append(flag)
        else:
            argv.append(f"{flag}={value}")  # "=" keeps values that start with "-" (a prompt, --seed -1)
    return argv


def launch(args, nproc: int) -> int:
    """Run this generation on ``nproc`` local processes, as ``torchrun --nproc-per-node N`` would, but
    report like one command: a bad input is the workers' one ``error:`` line (from rank 0) and the exit
    code is theirs (1, or 2 for weights), with no launcher traceback or failure summary."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = argv_from_args(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it, without its warning banner
    apply_safe_env()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    with _quiet("torch.distributed.elastic", logging.CRITICAL), _quiet("torch.distributed.launcher", logging.CRITICAL):
        try:
            elastic_launch(config, sys.executable)("-m", "ex4d.commands.torchrun", *argv)
        except ChildFailedError as exc:
            _, failure = exc.get_first_failure()
            code = failure.exitcode
            if code in (1, 2):
                return code  # rank 0 printed the one-line error
            print(f"error: internal error: a generation process failed with exit code {code} "
                  f"(rerun with --debug for the traceback)", file=sys.stderr)
            return 3
    return 0


def build_parser():
    """``ex4d generate``'s arguments plus ``--parallel``."""
    import argparse

    from ex4d.commands import generate

    root = argparse.ArgumentParser(prog="python -m ex4d.commands.torchrun")
    sub = root.add_subparsers(dest="command")
    generate.register(sub)
    parser = sub.choices["generate"]
    if "--parallel" not in parser._option_string_actions:
        add_parallel_arg(parser)
    if "--debug" not in parser._option_string_actions:  # ``ex4d --debug`` comes before the command there
        parser.add_argument("--debug", action="store_true", help="show full tracebacks (default off)")
    if "--overwrite" not in parser._option_string_actions:  # as ``ex4d`` adds it to every command
        parser.add_argument("--overwrite", action="store_true",
                            help="replace existing output files that ex4d did not write (default: refuse); inputs "
                                 "are never overwritten")
    parser.prog = "torchrun --nproc-per-node N -m ex4d.commands.torchrun"
    return parser


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m ex4d.commands.torchrun <ex4d generate args>``."""
    apply_safe_env()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ex4d.io.files import write_policy

    with write_policy(overwrite=getattr(args, "overwrite", False)):
        return generate_main(args)  # a UserError: one line from rank 0 and its exit code


if __name__ == "__main__":
    sys.exit(main())
