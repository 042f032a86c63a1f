"""The web app's page: a ``gr.Blocks`` whose events call :mod:`ex4d.app.backend` (which calls pipeline.py).

Each handler takes gradio's request to find the browser session's :class:`~ex4d.app.backend.Session`,
and turns user errors into one line on the page (``error_box`` and a ``gr.Warning``), never a
traceback; unexpected exceptions are logged with their traceback and shown as one line too, and the
app keeps serving. The elem_ids and the flow are listed in :mod:`ex4d.app`.
"""

from __future__ import annotations

import functools
import logging
import os

import gradio as gr

from ex4d.app.backend import MAX_FRAMES, VIDEO_SUFFIXES, AppBackend, Session
from ex4d.app.camera_edit import KEYFRAME_COLUMNS, PRESETS, preset_spec
from ex4d.app.outputs import LORA_LAUNCH_HINT, fast_preset_warning
from ex4d.errors import MissingWeightsError, UserError

log = logging.getLogger(__name__)

#: Depth sources besides the estimators: an uploaded depth file.
DEPTH_FILE = "file"
#: Height in pixels of the single video players (input, depth, generated), so a tab fits a screen.
VIDEO_HEIGHT = 420


def _session(backend: AppBackend, request: gr.Request | None) -> Session:
    return backend.session(getattr(request, "session_hash", None))


def _reporter(progress: gr.Progress):
    def report(done: int, total: int | None, desc: str) -> None:
        progress((done, total) if total else None, desc=desc)

    return report


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    log.error("internal error in the app", exc_info=exc)
    return f"error: internal error: {type(exc).__name__}: {exc} (logged; please report it)"


def _safe(n_outputs: int):
    """Wrap a handler whose last output is the error box: a raised error becomes one line there and a
    toast; the other outputs stay as they were (``gr.skip()``)."""

    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # the page shows one line; the app keeps serving
                line = _error_line(exc)
                gr.Warning(line)
                return tuple([gr.skip()] * (n_outputs - 1) + [line]) if n_outputs > 1 else line
            if n_outputs == 1:
                return ""
            if isinstance(result, WithError):
                return tuple(result)
            return (*result, "") if isinstance(result, tuple) else (result, "")

        return handler

    return wrap


class WithError(tuple):
    """A handler's full result, error box included (returned as is by :func:`_safe`)."""


def _info_markdown(info: dict) -> str:
    total = f"{info['video_frames']}+" if info["video_frames"] >= MAX_FRAMES else info["video_frames"]
    return (f"**{info['video']}**: {info['frames']} of {total} frames used, "
            f"{info['size']} (H x W, resize {info['resize']}), {info['fps']:g} fps. Depth: {info['depth']}.")


def _scene_html(session: Session, request: gr.Request | None = None) -> str:
    """The 3D view's iframe, addressed by the host name the browser used for the page (so that it also
    works when the app listens on another interface than 127.0.0.1), or a note saying why there is none."""
    import html
    from urllib.parse import urlsplit

    view = session.scene_view()
    if view is None:
        note = html.escape(session.scene_error or "3D view unavailable")
        return f"<div id='scene3d_unavailable'>{note}; the keyframe table and the preview still work.</div>"
    url = urlsplit(view.url)
    page_host = (getattr(request, "headers", None) or {}).get("host", "") if request is not None else ""
    hostname = urlsplit(f"//{page_host}").hostname if page_host else None
    src = f"{url.scheme}://{hostname or url.hostname}:{url.port}" if url.port else view.url
    return (f"<iframe id='scene3d_frame' src='{html.escape(src)}' style='width:100%;height:520px;border:0'"
            f" title='3D view'></iframe>")


def _visible_frame(visible):
    import pandas as pd

    return pd.DataFrame({"frame": list(range(len(visible))), "visible fraction": visible})


#: The preset selected when the page opens.
DEFAULT_PRESET = "orbit (reference)"
#: The preset sliders, in the order of the preset handler's inputs.
PRESET_PARAMS = ("angle", "travel", "direction", "yaw", "pitch", "radius", "ease")


def _shown(param: str, preset: str = DEFAULT_PRESET) -> bool:
    return param in PRESETS.get(preset, ())


def build_app(backend: AppBackend) -> gr.Blocks:
    """The page (not launched). ``backend`` holds the work folder and the sessions."""
    from ex4d.depth import ESTIMATORS
    from ex4d.synthetic.scenes import SCENES

    os.environ["GRADIO_TEMP_DIR"] = str(backend.workdir / "uploads")  # uploads stay inside the work folder
    # Gradio keeps a copy of every file it serves in its cache (inside the work folder): copies older than
    # a day are removed every hour. The runs themselves stay in the sessions' folders.
    # analytics_enabled=False: no telemetry and no version check; the app works offline and calls nobody.
    with gr.Blocks(title="ex4d", delete_cache=(3600, 86400), analytics_enabled=False) as demo:
        gr.Markdown("# ex4d: re-film a video along a new camera path\n"
                    "1 Input → 2 Depth → 3 Camera → 4 Preview → 5 Generate → 6 Outputs")
        error_box = gr.Textbox(label="Message", interactive=False, elem_id="error_box", lines=1)

        # ------------------------------------------------------------------ 1. input
        with gr.Tab("1. Input", elem_id="tab_input"):
            with gr.Row():
                example_scene = gr.Dropdown(sorted(SCENES), value="spheres_moving", label="Built-in example",
                                            elem_id="example_scene")
                example_button = gr.Button("Use the example", elem_id="example_button", variant="primary")
                upload_video = gr.File(label="or upload a video", file_types=list(VIDEO_SUFFIXES),
                                       elem_id="upload_video")
            with gr.Row():
                num_frames = gr.Number(value=49, precision=0, label="Frames (--num-frames; 4k+1 such as 49 for "
                                       "generation)", elem_id="num_frames")
                resize = gr.Radio(["reference", "keep"], value="reference",
                                  label="Resize (--resize): reference = multiples of 64, long side <= 1024",
                                  elem_id="resize")
                clip_button = gr.Button("Apply frames and resize", elem_id="clip_button")
            input_info = gr.Markdown("No video yet.", elem_id="input_info")
            input_video = gr.Video(label="Input", interactive=False, elem_id="input_video", height=VIDEO_HEIGHT)

        # ------------------------------------------------------------------ 2. depth
        with gr.Tab("2. Depth", elem_id="tab_depth"):
            with gr.Row():
                depth_source = gr.Radio([*ESTIMATORS, DEPTH_FILE], value=DEPTH_FILE,
                                        label="Depth from an estimator, or an uploaded depth file (.npz/.npy)",
                                        elem_id="depth_source")
                depth_file = gr.File(label="Depth file", file_types=[".npz", ".npy"], elem_id="depth_file")
                depth_button = gr.Button("Make depth", elem_id="depth_button", variant="primary")
            weights_panel = gr.Markdown(visible=False, elem_id="weights_panel")
            depth_preview = gr.Video(label="Depth preview (near = bright)", interactive=False,
                                     elem_id="depth_preview", height=VIDEO_HEIGHT)

        # ------------------------------------------------------------------ 3. camera
        with gr.Tab("3. Camera", elem_id="tab_camera"):
            with gr.Row():
                with gr.Column(scale=1):
                    preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset",
                                         elem_id="preset")
                    angle = gr.Slider(-90, 90, value=90, step=1, label="Orbit angle (degrees)", elem_id="angle",
                                      visible=_shown("angle"))
                    travel = gr.Slider(0.05, 1.0, value=0.5, step=0.05, elem_id="travel", visible=_shown("travel"),
                                       label="Travel: fraction of the nearest depth (zoom_in, dolly_zoom in; at most "
                                             "0.9) or of the pivot distance (zoom_out, dolly_zoom out)")
                    direction = gr.Radio(["out", "in"], value="out", label="Dolly-zoom direction",
                                         elem_id="direction", visible=_shown("direction"))
                    yaw = gr.Slider(-180, 180, value=45, step=1, label="Yaw (degrees)", elem_id="yaw",
                                    visible=_shown("yaw"))
                    pitch = gr.Slider(-60, 60, value=0, step=1, label="Pitch (degrees; + raises the camera)",
                                      elem_id="pitch", visible=_shown("pitch"))
                    radius = gr.Slider(0.25, 3, value=1, step=0.05, label="Orbit radius (x pivot distance)",
                                       elem_id="radius", visible=_shown("radius"))
                    ease = gr.Radio(["linear", "smooth"], value="linear", label="Ease", elem_id="ease",
                                    visible=_shown("ease"))
                    preset_button = gr.Button("Use preset", elem_id="preset_button", variant="primary")
                    path_info = gr.Markdown("Path: preset `90`", elem_id="path_info")
                with gr.Column(scale=2):
                    scene_kind = gr.Radio([("points", "points"), ("DW-Mesh", "mesh")], value="points",
                                          label="Frame 0 in 3D as", elem_id="scene_kind")
                    scene3d = gr.HTML("<div>Pick an input to see the scene.</div>", elem_id="scene3d")
                    frame_slider = gr.Slider(0, 48, value=0, step=1, label="Frame (timeline)",
                                             elem_id="frame_slider")
                    with gr.Row():
                        look_button = gr.Button("Look through this frame's camera", elem_id="look_button")
                        to_keyframes_button = gr.Button("Edit as keyframes", elem_id="to_keyframes_button")
                        add_keyframe_button = gr.Button("Add keyframe at this frame", elem_id="add_keyframe_button")
                        delete_keyframe_button = gr.Button("Delete keyframe at this frame",
                                                           elem_id="delete_keyframe_button")
            keyframes = gr.Dataframe(headers=list(KEYFRAME_COLUMNS), datatype=["number"] * len(KEYFRAME_COLUMNS),
                                     column_count=(len(KEYFRAME_COLUMNS), "fixed"), interactive=True,
                                     label="Keyframes: camera centre x, y, z and the point it looks at, world "
                                           "coordinates (x right, y down, z forward); focal in px, blank = source",
                                     elem_id="keyframes")
            with gr.Row():
                import_path = gr.File(label="Import a pose file (.json / .npz)", file_types=[".json", ".npz"],
                                      elem_id="import_path")
                export_json_button = gr.Button("Export JSON", elem_id="export_json_button")
                export_npz_button = gr.Button("Export npz", elem_id="export_npz_button")
                export_file = gr.File(label="Exported pose file", interactive=False, elem_id="export_file")
            gr.Markdown("The preview renders keyframes from JSON and presets from npz: export that format for "
                        "bit-identical cameras in `ex4d recon --cam FILE` (a preset as JSON agrees to about 1e-15).")

        # ------------------------------------------------------------------ 4. preview
        with gr.Tab("4. Preview", elem_id="tab_preview"):
            preview_button = gr.Button("Preview", elem_id="preview_button", variant="primary")
            preview_warning = gr.Markdown("", elem_id="preview_warning")
            with gr.Row():
                preview_color = gr.Video(label="Colour", interactive=False, elem_id="preview_color")
                preview_mask = gr.Video(label="Mask (white: seen by the source camera)", interactive=False,
                                        elem_id="preview_mask")
            visible_plot = gr.LinePlot(x="frame", y="visible fraction", y_lim=[0, 1],
                                       label="Visible fraction per frame", elem_id="visible_plot")

        # ------------------------------------------------------------------ 5. generate
        with gr.Tab("5. Generate", elem_id="tab_generate"):
            gr.Markdown("Fills in what the last preview's mask marks as unseen. Needs the Wan2.1-I2V-14B and EX-4D "
                        "weights (docs/models.md) and, in practice, a GPU; the models stay loaded between runs. One "
                        "generation runs at a time; others wait in the queue, which shows their position.")
            with gr.Row():
                gen_preset = gr.Radio(["full", "fast"], value="full", elem_id="gen_preset",
                                      label="Sampler preset (--preset): full = 25 steps, CFG 5; fast = 4 steps, no CFG")
                # The browser shows an empty Number as 0 and sends 0: 0 (never a valid value) means "the preset's".
                gen_steps = gr.Number(value=None, precision=0, label="Steps (0 or blank: the preset's)",
                                      elem_id="gen_steps")
                gen_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="gen_seed")
                gen_cfg = gr.Number(value=None, label="CFG / guidance (0 or blank: the preset's)", elem_id="gen_cfg")
                gen_size = gr.Textbox(value="512x512", label="Size (HxW)", elem_id="gen_size")
            with gr.Row():
                gen_low_vram = gr.Checkbox(label="--low-vram", elem_id="gen_low_vram")
                gen_vram_budget = gr.Number(value=None, label="--vram-budget GiB (0 or blank: the GPU's)",
                                            elem_id="gen_vram_budget")
                gen_cpu_offload = gr.Checkbox(label="--cpu-offload", elem_id="gen_cpu_offload")
                # What this machine cannot run is shown greyed out with the reason, not offered and refused later.
                fp8_missing, fp8_attention_missing = gpu_feature_gaps()
                gen_fp8 = gr.Checkbox(label="--fp8", elem_id="gen_fp8", interactive=not fp8_missing,
                                      info=fp8_missing or None)
                gen_compile = gr.Checkbox(label="--compile", elem_id="gen_compile")
                gen_fp8_attention = gr.Checkbox(label="--attention fp8 (Hopper or newer)", elem_id="gen_fp8_attention",
                                                interactive=not fp8_attention_missing,
                                                info=fp8_attention_missing or None)
            # Extra LoRAs: only those given at launch (ex4d app --lora), ticked by label; the page never takes a path.
            launch_labels = backend.lora_labels()
            gen_loras = gr.CheckboxGroup(launch_labels, value=[], elem_id="gen_loras", visible=bool(launch_labels),
                                         label="Extra LoRAs (--lora; given when the app was started), merged in the "
                                               "order listed")
            gr.Markdown(  # how to add LoRAs, shown only when none was given at launch
                "" if launch_labels else f"No extra LoRAs. To use one (e.g. a step-distillation LoRA for the fast "
                                         f"preset), start the app with `ex4d app --lora FILE[:STRENGTH]` (repeatable), "
                                         f"e.g. `{LORA_LAUNCH_HINT}`.",
                elem_id="gen_lora_hint", visible=not launch_labels)
            gen_lora_warning = gr.Markdown("", elem_id="gen_lora_warning")
            with gr.Row():
                generate_button = gr.Button("Generate", elem_id="generate_button", variant="primary")
                abort_button = gr.Button("Abort", elem_id="abort_button", variant="stop")
            gen_weights_panel = gr.Markdown(visible=False, elem_id="gen_weights_panel")
            final_video = gr.Video(label="Generated video", interactive=False, elem_id="final_video",
                                   height=VIDEO_HEIGHT)
            eval_report = gr.Markdown("", elem_id="eval_report")

        # ------------------------------------------------------------------ 6. outputs
        with gr.Tab("6. Outputs", elem_id="tab_outputs"):
            output_files = gr.File(label="Files of the last run", file_count="multiple", interactive=False,
                                   elem_id="output_files")
            cli_command = gr.Code(label="The same result from the command line", language="shell",
                                  interactive=False, elem_id="cli_command", wrap_lines=True)

        poll = gr.Timer(1.0)  # polls for keyframes edited in the 3D view
        shown_version = gr.State(-1)

        # ------------------------------------------------------------------ handlers
        def after_input(session: Session, info: dict, request: gr.Request):
            session.update_scene_safely()
            return (_info_markdown(info), str(session.video), gr.update(maximum=max(info["frames"] - 1, 1), value=0),
                    _scene_html(session, request), session.path.describe(),
                    None if session.depth_preview is None else str(session.depth_preview))

        input_outputs = [input_info, input_video, frame_slider, scene3d, path_info, depth_preview, error_box]

        @_safe(len(input_outputs))
        def on_example(scene, frames, request: gr.Request, progress=gr.Progress()):
            session = _session(backend, request)
            return after_input(session, session.load_example(scene, num_frames=int(frames or 49),
                                                             progress=_reporter(progress)), request)

        @_safe(len(input_outputs))
        def on_upload(upload, frames, resize_value, request: gr.Request):
            if upload is None:
                _nothing_uploaded()
            session = _session(backend, request)
            return after_input(session, session.set_video(upload, num_frames=int(frames or 49), resize=resize_value),
                               request)

        @_safe(len(input_outputs))
        def on_clip(frames, resize_value, request: gr.Request):
            session = _session(backend, request)
            return after_input(session, session.set_clip_settings(int(frames), resize_value), request)

        @_safe(4)
        def on_depth(source, upload, request: gr.Request, progress=gr.Progress()):
            session = _session(backend, request)
            try:
                result = session.estimate_depth(source, upload, progress=_reporter(progress))
            except MissingWeightsError as exc:
                lines = session.missing_depth_weights(source) or [str(exc)]
                panel = "### Missing weights for " + source + "\n\nEverything else works with a depth file.\n\n" + \
                    "\n".join(f"- {line}" for line in lines)
                gr.Warning(f"missing weights for {source}: see the panel")
                return WithError((gr.update(value=panel, visible=True), gr.skip(), gr.skip(),
                                  f"error: missing weights for {source}; see the panel"))
            session.update_scene_safely()
            return gr.update(visible=False), str(result.preview), _scene_html(session, request)

        @_safe(4)
        def on_preset(name, angle_v, travel_v, direction_v, yaw_v, pitch_v, radius_v, ease_v, request: gr.Request):
            session = _session(backend, request)
            session.set_preset(preset_spec(name, angle=angle_v, travel=travel_v, direction=direction_v, yaw=yaw_v,
                                           pitch=pitch_v, radius=radius_v, ease=ease_v))
            session.update_scene_safely(points=False)
            return session.path.describe(), [], session.path.version

        @_safe(4)
        def on_keyframes_edited(rows, request: gr.Request):
            session = _session(backend, request)
            session.set_keyframes(_rows(rows))
            session.update_scene_safely(points=False)
            return session.path.describe(), session.keyframe_rows(), session.path.version

        def keyframe_action(action):
            @_safe(4)
            def handler(frame, request: gr.Request):
                session = _session(backend, request)
                action(session, int(frame))
                session.update_scene_safely(points=False)
                return session.path.describe(), session.keyframe_rows(), session.path.version

            return handler

        @_safe(1)
        def on_scene_kind(kind, request: gr.Request):
            _session(backend, request).set_scene_kind(kind)

        @_safe(1)
        def on_look(frame, request: gr.Request):
            _session(backend, request).look_through(int(frame))

        @_safe(1)
        def on_frame(frame, request: gr.Request):
            _session(backend, request).set_frame(int(frame))

        @_safe(4)
        def on_import(upload, request: gr.Request):
            if upload is None:
                _nothing_uploaded()
            session = _session(backend, request)
            session.import_pose_file(upload)
            session.update_scene_safely(points=False)
            return session.path.describe(), [], session.path.version

        def exporter(fmt):
            @_safe(2)
            def handler(request: gr.Request):
                return str(_session(backend, request).export_path(fmt))

            return handler

        def on_poll(version, request: gr.Request):
            # The 3D view's drags change the session's keyframes on viser's thread; the page catches up here.
            session = backend.sessions.get(getattr(request, "session_hash", None) or "")
            if session is None or session.path.version == version:
                return gr.skip(), gr.skip(), gr.skip()
            rows = session.keyframe_rows() if session.path.mode == "keyframes" else []
            return session.path.describe(), rows, session.path.version

        @_safe(7)
        def on_preview(request: gr.Request, progress=gr.Progress()):
            session = _session(backend, request)
            result = session.preview(progress=_reporter(progress))
            files = [str(p) for p in result.files.values()]
            return (str(result.files["color"]), str(result.files["mask"]), _visible_frame(result.visible),
                    result.warning or f"Lowest visible fraction: {100 * min(result.visible):.1f}% (frame "
                                      f"{result.visible.index(min(result.visible))}).",
                    files, "\n".join(result.commands))

        def on_lora_choice(sampler_preset, selected):
            return fast_preset_warning(sampler_preset, len(selected or ()), len(launch_labels))

        @_safe(6)
        def on_generate(steps, seed, cfg, size, low_vram, vram_budget, cpu_offload, fp8, compile_, sampler_preset,
                        loras, fp8_attention=False, request: gr.Request = None, progress=gr.Progress()):
            from ex4d.pipeline import GenerateOptions

            session = _session(backend, request)
            options = GenerateOptions(seed=int(seed or 0), steps=int(steps) if steps else None,
                                      cfg=float(cfg) if cfg else None, size=str(size).strip(),
                                      preset=sampler_preset or "full", loras=backend.selected_loras(loras),
                                      low_vram=bool(low_vram), vram_budget=float(vram_budget) if vram_budget else None,
                                      cpu_offload=bool(cpu_offload), fp8=bool(fp8), compile=bool(compile_),
                                      attention="fp8" if fp8_attention else None)
            try:
                result = session.generate(options, progress=_reporter(progress))
            except MissingWeightsError as exc:
                lines = session.missing_generation_weights() or [str(exc)]
                panel = "### Missing weights for generation\n\n" + "\n".join(f"- {line}" for line in lines)
                gr.Warning("missing weights for generation: see the panel")
                return WithError((gr.update(value=panel, visible=True), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                                  "error: missing weights for generation; see the panel"))
            files = [str(p) for p in list(session.last_preview.files.values()) + list(result.files.values())]
            return (gr.update(visible=False), str(result.video), eval_markdown(result), files,
                    "\n".join(result.commands))

        @_safe(1)
        def on_abort(request: gr.Request):
            _session(backend, request).request_abort()
            gr.Info("stopping at the next step")

        # ------------------------------------------------------------------ wiring
        example_button.click(on_example, [example_scene, num_frames], input_outputs, api_name="example")
        upload_video.upload(on_upload, [upload_video, num_frames, resize], input_outputs, api_name="upload_video")
        clip_button.click(on_clip, [num_frames, resize], input_outputs, api_name="clip")
        depth_event = depth_button.click(
            on_depth, [depth_source, depth_file], [weights_panel, depth_preview, scene3d, error_box], api_name="depth",
            concurrency_limit=1, concurrency_id="depth")  # one estimator in memory at a time
        preset_outputs = [path_info, keyframes, shown_version, error_box]

        def on_preset_choice(name):
            return tuple(gr.update(visible=_shown(param, name)) for param in PRESET_PARAMS)

        preset.change(on_preset_choice, [preset], [angle, travel, direction, yaw, pitch, radius, ease], api_name=False,
                      queue=False, show_progress="hidden")
        preset_button.click(on_preset, [preset, angle, travel, direction, yaw, pitch, radius, ease], preset_outputs,
                            api_name="preset")
        keyframes.input(on_keyframes_edited, [keyframes], preset_outputs, api_name="keyframes")
        to_keyframes_button.click(keyframe_action(lambda s, f: s.to_keyframes()), [frame_slider], preset_outputs,
                                  api_name="to_keyframes")
        add_keyframe_button.click(keyframe_action(lambda s, f: s.add_keyframe(f)), [frame_slider], preset_outputs,
                                  api_name="add_keyframe")
        delete_keyframe_button.click(keyframe_action(lambda s, f: s.delete_keyframe(f)), [frame_slider],
                                     preset_outputs, api_name="delete_keyframe")
        look_button.click(on_look, [frame_slider], [error_box], api_name="look_through")
        scene_kind.input(on_scene_kind, [scene_kind], [error_box], api_name="scene_kind")
        frame_slider.release(on_frame, [frame_slider], [error_box], api_name="set_frame")
        import_path.upload(on_import, [import_path], preset_outputs, api_name="import_path")
        export_json_button.click(exporter("json"), None, [export_file, error_box], api_name="export_json")
        export_npz_button.click(exporter("npz"), None, [export_file, error_box], api_name="export_npz")
        poll.tick(on_poll, [shown_version], [path_info, keyframes, shown_version], show_progress="hidden",
                  api_name=False, queue=False)  # a cheap read every second: not through the job queue
        preview_event = preview_button.click(
            on_preview, None, [preview_color, preview_mask, visible_plot, preview_warning, output_files, cli_command,
                               error_box], api_name="preview")
        generate_event = generate_button.click(
            on_generate, [gen_steps, gen_seed, gen_cfg, gen_size, gen_low_vram, gen_vram_budget, gen_cpu_offload,
                          gen_fp8, gen_compile, gen_preset, gen_loras, gen_fp8_attention],
            [gen_weights_panel, final_video, eval_report, output_files, cli_command, error_box], api_name="generate",
            concurrency_limit=1, concurrency_id="generate")  # one GPU job at a time; the queue shows positions
        # The fast preset's warning follows the preset and the ticked LoRAs (a page-local read: no queue).
        for control in (gen_preset, gen_loras):
            control.change(on_lora_choice, [gen_preset, gen_loras], [gen_lora_warning], queue=False,
                           show_progress="hidden", api_name="generate_warning" if control is gen_preset else False)
        # Abort sets the session's flag, which stops a running depth, preview or generation at its next frame or
        # sampling step (a thread cannot be killed), and cancels this page's runs still waiting in the queue.
        abort_button.click(on_abort, None, [error_box], api_name="abort", queue=False,
                           cancels=[depth_event, preview_event, generate_event])

        def on_unload(request: gr.Request):
            backend.end_session(getattr(request, "session_hash", None))

        demo.unload(on_unload)
    return demo


def _nothing_uploaded():
    """An upload event without a file (a cleared box): one line, nothing else happens."""
    raise UserError("nothing was uploaded; choose a file")


def _rows(value) -> list[list]:
    """The Dataframe's value (a pandas DataFrame, or a dict/list from the API) -> list of rows."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):
        return value.values.tolist()
    if isinstance(value, dict):
        return list(value.get("data") or [])
    return [list(row) for row in value]


#: Sections of ex4d eval's summary shown on the page (docs/eval.md), in order.
EVAL_SECTIONS = ("camera_following", "kept_what_was_seen", "temporal_stability", "learned_consistency")


def eval_markdown(result) -> str:
    """The eval report's figures (docs/eval.md) as a short table, or the reason there is none."""
    if result.eval_summary is None:
        return f"Evaluation not available: {result.eval_error}" if result.eval_error else ""
    lines = ["| section | figure | value |", "|---|---|---|"]
    for section in EVAL_SECTIONS:
        values = result.eval_summary.get(section) or {}
        for key, value in values.items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and key != "depth_file" \
                    and len(str(value)) <= 60:  # figures, not the summary's explanatory sentences
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"| {section.replace('_', ' ')} | {key} | {shown} |")
    return "**Evaluation** (`ex4d eval`; report.html is among the run's files)\n\n" + "\n".join(lines)


def gpu_feature_gaps() -> tuple[str, str]:
    """Why this machine cannot run --fp8 and --attention fp8, in a few words for the page ("" where it can).

    The conditions are the commands' own (ex4d.diffusion.fp8.fp8_gap and attention_fp8.fp8_attention_gap,
    which their checks use); the commands give the full one-line errors.
    """
    from ex4d.diffusion.attention_fp8 import fp8_attention_gap
    from ex4d.diffusion.fp8 import fp8_gap

    return tuple(f"not available: {gap}" if gap else "" for gap in (fp8_gap(), fp8_attention_gap()))


def launch(backend: AppBackend, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_upload_mb: float = 500.0, block: bool = True) -> gr.Blocks:
    """Build and start the page; returns the Blocks (``block=False`` returns at once, as tests use it:
    ``demo.local_url`` is the page's address, ``demo.close()`` stops it)."""
    demo = build_app(backend)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb:g}mb",
                allowed_paths=[str(backend.workdir)], prevent_thread_lock=not block, quiet=not block,
                show_error=False, inbrowser=False)
    return demo


