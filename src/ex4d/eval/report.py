"""The ``ex4d eval`` report: a contact sheet (PNG) and a self-contained HTML page (inline SVG curves,
the contact sheet inlined as a data URI; nothing is fetched from the network)."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

#: Frames shown on the contact sheet (evenly spaced, first and last included).
SHEET_COLUMNS = 6
#: Width of one contact-sheet tile in pixels.
TILE_WIDTH = 160


def contact_sheet(video: np.ndarray, condition: np.ndarray | None = None, mask: np.ndarray | None = None) -> bytes:
    """PNG bytes: rows video / condition / mask (those given) x up to SHEET_COLUMNS evenly spaced frames."""
    from PIL import Image, ImageDraw

    num = len(video)
    picks = sorted(set(np.linspace(0, num - 1, min(SHEET_COLUMNS, num)).round().astype(int).tolist()))
    rows = [video]
    if condition is not None:
        rows.append(condition)
    if mask is not None:
        rows.append(np.repeat((np.asarray(mask, np.uint8) * 255)[..., None], 3, axis=-1))
    height, width = video.shape[1:3]
    tile_h = max(1, round(TILE_WIDTH * height / width))
    label_h = 14
    sheet = Image.new("RGB", (TILE_WIDTH * len(picks), (tile_h + label_h) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    names = ["video", "condition", "mask"][:len(rows)] if condition is not None else ["video", "mask"][:len(rows)]
    for r, (name, frames) in enumerate(zip(names, rows)):
        for c, k in enumerate(picks):
            tile = Image.fromarray(np.asarray(frames[k], np.uint8)).resize((TILE_WIDTH, tile_h), Image.BILINEAR)
            y = r * (tile_h + label_h)
            sheet.paste(tile, (c * TILE_WIDTH, y + label_h))
            draw.text((c * TILE_WIDTH + 3, y + 1), f"{name} {k}", fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def svg_curve(title: str, values, unit: str = "", width: int = 460, height: int = 170) -> str:
    """An inline SVG polyline of per-frame values (None = missing, drawn as a gap)."""
    pad_l, pad_r, pad_t, pad_b = 48, 10, 22, 24
    finite = [(k, float(v)) for k, v in enumerate(values) if v is not None]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'style="background:#fafafa;border:1px solid #ddd;margin:4px">',
             f'<text x="{pad_l}" y="15" font-size="13" font-family="sans-serif">{html.escape(title)}'
             f'{" (" + html.escape(unit) + ")" if unit else ""}</text>']
    if not finite:
        parts.append(f'<text x="{pad_l}" y="{height // 2}" font-size="12" fill="#888">no values</text></svg>')
        return "".join(parts)
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    span_k = max(len(values) - 1, 1)

    def xy(k, v):
        x = pad_l + (width - pad_l - pad_r) * k / span_k
        y = pad_t + (height - pad_t - pad_b) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    segments, current = [], []
    for k, v in enumerate(values):
        if v is None:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(xy(k, float(v)))
    if current:
        segments.append(current)
    for seg in segments:
        if len(seg) == 1:
            x, y = seg[0].split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="#1f5fbf"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="{" ".join(seg)}"/>')
    for v in (lo, hi):
        y = xy(0, v).split(",")[1]
        parts.append(f'<text x="2" y="{y}" font-size="10" font-family="sans-serif">{v:.3g}</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 6}" font-size="10" font-family="sans-serif">frame 0</text>'
                 f'<text x="{width - pad_r - 50}" y="{height - 6}" font-size="10" font-family="sans-serif">'
                 f'frame {len(values) - 1}</text></svg>')
    return "".join(parts)


def render_html(summary: dict, sheet_png: bytes) -> str:
    """The report page: headline figures, per-frame curves, the contact sheet, and the full JSON."""
    per = summary["per_frame"]
    cam = summary["camera_following"]
    kept = summary.get("kept_what_was_seen")
    stab = summary["temporal_stability"]

    def fmt(v, digits=4):
        return "n/a" if v is None else f"{v:.{digits}g}"

    rows = [("RotErr sum (deg)", fmt(cam["rot_err_sum_deg"])), ("TransErr sum", fmt(cam["trans_err_sum"])),
            ("RotErr mean (deg)", fmt(cam["rot_err_mean_deg"])), ("TransErr mean", fmt(cam["trans_err_mean"])),
            ("unregistered fraction", fmt(cam["unregistered_fraction"])), ("route", cam["method"]),
            ("scale alignment", f'{cam["scale_alignment"]}; s = {fmt(cam["scale"])}'),
            ("warp error mean (whole frame)", fmt(stab["warp_error_mean"])),
            ("warp error mean (generated region)", fmt(stab["warp_error_generated_mean"]))]
    if kept:
        rows += [("PSNR mean, visible (dB)", fmt(kept["psnr_mean"])), ("SSIM mean, visible", fmt(kept["ssim_mean"])),
                 ("visible fraction mean", fmt(kept["visible_fraction_mean"])),
                 ("mask erosion (px)", str(kept["erode_margin_px"]))]
    learned = summary.get("learned_consistency")
    if learned:
        rows += [("subject consistency (DINO)", fmt(learned["subject_consistency"])),
                 ("background consistency (CLIP)", fmt(learned["background_consistency"]))]
    table = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    curves = [svg_curve("RotErr", per["rot_err_deg"], "deg"), svg_curve("TransErr", per["trans_err"]),
              svg_curve("warp error, whole frame", per["warp_error"]),
              svg_curve("warp error, generated region", per["warp_error_generated"])]
    if kept:
        curves += [svg_curve("PSNR, visible", per["psnr"], "dB"), svg_curve("SSIM, visible", per["ssim"]),
                   svg_curve("visible fraction", per["visible_fraction"])]
    for key, label in (("subject_consistency", "subject consistency (DINO)"),
                       ("background_consistency", "background consistency (CLIP)")):
        if key in per:
            curves.append(svg_curve(label, per[key]))
    sheet = base64.b64encode(sheet_png).decode("ascii")
    title = f"ex4d eval: {summary['video']}"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:20px;max-width:1000px}}th{{text-align:left;padding-right:16px}}
td,th{{font-size:14px;padding:2px 6px}}pre{{font-size:11px;background:#f4f4f4;padding:8px;overflow:auto}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>camera {html.escape(summary['camera'])}; {summary['num_frames']} frames, {summary['size'][0]}x{summary['size'][1]}.
Definitions: docs/eval.md.</p>
<table>{table}</table>
<h2>Per-frame curves</h2>
<div>{''.join(curves)}</div>
<h2>Contact sheet</h2>
<img alt="contact sheet" src="data:image/png;base64,{sheet}" style="max-width:100%">
<h2>Summary (summary.json)</h2>
<pre>{html.escape(json.dumps({k: v for k, v in summary.items() if k != 'per_frame'}, indent=1))}</pre>
</body></html>
"""
