"""``ex4d app``: the local web app (Gradio page with a 3D view); needs the ``app`` extra."""

from __future__ import annotations

import argparse
import sys

#: Where the app keeps its sessions when --workdir is not given.
DEFAULT_WORKDIR = "~/.cache/ex4d/app"
DEFAULT_PORT = 7860
INSTALL_HINT = 'pip install -e ".[app]"'

EPILOG = """examples:
  ex4d app                                   # http://127.0.0.1:7860 (or the next free port)
  ex4d app --models-dir models --port 8000   # with downloaded weights (depth estimators, generation)
  ex4d app --host 0.0.0.0                    # reachable from other machines: only on a network you trust
  ex4d app --models-dir models --lora distill.safetensors   # a LoRA the Generate tab can tick (preset fast)
"""


def register(subparsers) -> None:
    from ex4d.commands.common import add_device_arg

    parser = subparsers.add_parser(
        "app", help="the local web app: example or upload, depth, camera path in 3D, preview, generate",
        description="Start the ex4d web app: pick the built-in example or upload a video, make its depth, "
                    "direct the camera with presets or keyframes in a 3D view, preview the colour and mask "
                    "renders, generate, and download every file with the equivalent command lines. It writes "
                    "only inside --workdir and reads only there, the weights and the --lora files. Needs the app extra: " + INSTALL_HINT,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"work folder: uploads, one subfolder per browser session and one per run "
                             f"(default {DEFAULT_WORKDIR})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default {DEFAULT_PORT}, or the next free one after it)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (default off; anyone with the link can use the app)")
    parser.add_argument("--max-upload-mb", type=float, default=500.0,
                        help="largest upload in megabytes (default 500)")
    parser.add_argument("--models-dir", default=None,
                        help="folder with downloaded weights (default: the Hugging Face cache; docs/models.md)")
    parser.add_argument("--lora", dest="loras", action="append", default=None, metavar="FILE[:STRENGTH]",
                        help="an extra Wan2.1-I2V-14B LoRA that the Generate tab offers as a tick box (as ex4d "
                             "generate --lora; e.g. a step-distillation LoRA for the fast preset); repeat for "
                             "several. The page never takes a path, so this is the only way to add one "
                             "(default: none)")
    add_device_arg(parser)
    parser.set_defaults(func=main)


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on ``port`` at ``host`` (a bind succeeds)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except socket.gaierror:  # not an address of this machine's
            from ex4d.errors import InputError

            raise InputError(f"--host {host} is not an address this machine can listen on; use 127.0.0.1 (the "
                             f"default) or 0.0.0.0") from None
        except OSError:
            return False
    return True


def free_port(host: str, start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from ``start`` on that nothing listens on at ``host``."""
    for port in range(start, start + tries):
        if port_is_free(host, port):
            return port
    from ex4d.errors import InputError

    raise InputError(f"no free port from {start} to {start + tries - 1} on {host}; pass --port")


def main(args) -> int:
    import importlib.util

    from ex4d.errors import InputError

    if importlib.util.find_spec("gradio") is None:  # the 3D view (viser) is optional: the page says so
        raise InputError(f"the web app needs its optional extra; install it with: {INSTALL_HINT}")
    if not 0 < args.max_upload_mb <= 100_000:
        raise InputError(f"--max-upload-mb must be from 0 to 100000, got {args.max_upload_mb:g}")
    if args.port is not None and not 0 < args.port < 65536:
        raise InputError(f"--port must be from 1 to 65535, got {args.port}")
    if args.port is not None and not port_is_free(args.host, args.port):
        raise InputError(f"port {args.port} on {args.host} is in use; choose another --port, or leave it out to take "
                         f"the next free one from {DEFAULT_PORT}")
    import logging

    from ex4d.app.backend import AppBackend
    from ex4d.app.ui import launch

    logging.getLogger("ex4d").setLevel(logging.INFO)
    # A bad --lora is refused here, before the backend makes its work folder (AppBackend checks them first).
    backend = AppBackend(args.workdir, models_dir=args.models_dir, device=args.device, host=args.host,
                         loras=args.loras)
    port = args.port if args.port is not None else free_port(args.host)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # where this machine's browser finds it
    offered = f"; extra LoRAs: {', '.join(backend.lora_labels())}" if backend.loras else ""
    print(f"ex4d app: work folder {backend.workdir}{offered}; open http://{shown}:{port} (Ctrl-C stops)",
          file=sys.stderr)
    try:
        launch(backend, host=args.host, port=port, share=args.share, max_upload_mb=args.max_upload_mb, block=True)
    finally:
        backend.close()
    return 0
