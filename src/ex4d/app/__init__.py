"""ex4d.app: the local web app (``ex4d app``; optional extra ``pip install -e ".[app]"``).

Page flow and the elem_ids the browser tests drive
---------------------------------------------------
The page is one ``gr.Blocks`` with six tabs; every control below has a stable ``elem_id``
(``#elem_id`` in CSS selectors). One line of errors for the whole page: ``#error_box`` (empty when
the last action succeeded; ``error: ...`` otherwise, also shown as a toast).

1. Input (``#tab_input``): ``#example_scene`` (dropdown of synthetic scenes), ``#example_button``
   (makes the example, with exact depth, so nothing else is needed), ``#upload_video`` (file upload),
   ``#num_frames``, ``#resize`` and ``#clip_button`` (the CLI's --num-frames / --resize),
   ``#input_info`` (frames, size, fps, depth source), ``#input_video``.
2. Depth (``#tab_depth``): ``#depth_source`` (radio: the estimators of ``ex4d.depth.ESTIMATORS`` and
   ``file``), ``#depth_file`` (upload .npz/.npy), ``#depth_button``, ``#weights_panel`` (visible only
   when weights are missing: every missing file and its download command), ``#depth_preview``.
3. Camera (``#tab_camera``): ``#preset`` (dropdown), sliders ``#angle``, ``#travel``, ``#direction``,
   ``#yaw``, ``#pitch``, ``#radius``, ``#ease``; ``#preset_button``; ``#path_info`` (what the path is);
   ``#scene_kind`` (radio: frame 0 drawn as points or as its DW-Mesh), ``#scene3d`` (holds the 3D
   view's ``<iframe id="scene3d_frame">``, or ``#scene3d_unavailable``);
   ``#frame_slider`` (timeline), ``#look_button``, ``#to_keyframes_button`` (preset -> editable
   keyframes at the first, middle and last frame), ``#add_keyframe_button`` and
   ``#delete_keyframe_button`` (at the slider's frame); ``#keyframes`` (table: frame, x, y, z,
   look_x, look_y, look_z, focal; editing a cell applies it); ``#import_path`` (upload .json/.npz),
   ``#export_json_button``, ``#export_npz_button``, ``#export_file`` (the download).
4. Preview (``#tab_preview``): ``#preview_button``, ``#preview_warning`` (the lowest visible fraction,
   or a warning with the frame), ``#preview_color`` and ``#preview_mask`` (videos side by side),
   ``#visible_plot``.
5. Generate (``#tab_generate``): ``#gen_preset`` (full / fast), ``#gen_steps`` and ``#gen_cfg``
   (0 or blank: the preset's), ``#gen_seed``, ``#gen_size``, ``#gen_low_vram``, ``#gen_vram_budget``,
   ``#gen_cpu_offload``, ``#gen_fp8``, ``#gen_compile``, ``#gen_loras`` (tick boxes: the extra LoRAs given
   at launch, ``ex4d app --lora FILE[:STRENGTH]``, by file name and strength; hidden when there are none),
   ``#gen_lora_hint`` (shown instead: how to start the app with one), ``#gen_lora_warning`` (the fast
   preset without a LoRA: a warning line, generation still runs), ``#generate_button``, ``#abort_button``
   (stops a running depth estimate, preview or generation at its next step), ``#gen_weights_panel`` (visible only when
   generation weights are missing), ``#final_video``, ``#eval_report``.
6. Outputs (``#tab_outputs``): ``#output_files`` (every file of the last run), ``#cli_command``.

Typical flow: example -> preset -> keyframe edit -> preview -> export::

    click #example_button                      (input, depth and 3D view ready)
    choose #preset, move sliders, click #preset_button
    click #to_keyframes_button, edit a cell of #keyframes (or drag a keyframe in the 3D view)
    click #preview_button                      (#preview_color / #preview_mask play; #visible_plot)
    click #export_json_button                  (#export_file: path.json for ex4d recon --cam)

The same events are API endpoints for ``gradio_client`` (``api_name``): ``/example``,
``/upload_video``, ``/clip``, ``/depth``, ``/preset``, ``/keyframes``, ``/to_keyframes``,
``/add_keyframe``, ``/delete_keyframe``, ``/look_through``, ``/scene_kind``, ``/set_frame``, ``/import_path``,
``/export_json``, ``/export_npz``, ``/preview``, ``/generate`` (its last input: the ticked LoRA labels),
``/generate_warning`` (the fast-preset warning for a preset and ticked labels), ``/abort``.

Modules: :mod:`ex4d.app.backend` (no gradio: sessions, work folder, depth, preview, generation),
:mod:`ex4d.app.camera_edit` (presets and keyframes as pose files), :mod:`ex4d.app.progress` (progress
and Abort), :mod:`ex4d.app.outputs` (settings, warnings, the equivalent command lines),
:mod:`ex4d.app.ui` (the page), :mod:`ex4d.app.scene3d` (the viser 3D view embedded as an iframe).
"""
