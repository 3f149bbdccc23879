"""Edit-task masks: inpainting ("AI Erase"), outpainting and expansion ("AI Expand").

An edit config's model sees three extra kinds of channels concatenated to the noisy latent:
``x = cat([x_t, edit_source, edit_mask], 1)`` with ``edit_mask`` (B, 1, H, W), 1 = regenerate,
0 = keep, and ``edit_source = latents * (1 - edit_mask)`` (the kept content, zeros where the
model must generate). Masks are binary (hard boundary) at latent resolution.

Tasks (:data:`EDIT_TASKS`, plus ``"mixed"``: one task drawn per sample):

* ``inpaint``: regenerate 1-3 random boxes (each 10-50% of each side) and, with probability
  1/2 per sample, 1-2 thick random strokes (4-segment polylines), the rest is kept.
* ``outpaint``: keep a subject region (an axis-aligned ellipse, radii 20-30% of each side,
  center in the middle 20% of the image, so it stays inside [0.1, 0.9] of each side),
  regenerate everything around it.
* ``expand``: keep a centered crop (50-80% of each side, independently), regenerate the
  border, as when extending an image to a larger canvas.

All randomness comes from ``generator`` (drawn on its device, then moved), in a fixed order
and amount per call regardless of the task, so a trainer that seeds the generator per
(seed, batch index) gets bit-identical masks on resume. Everything is vectorized (no
per-sample Python loops, no host syncs).
"""

from __future__ import annotations

import torch

EDIT_TASKS = ("inpaint", "outpaint", "expand")
_MAX_BOXES = 3
_MAX_STROKES = 2
_STROKE_POINTS = 5


def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-center coordinates in [0, 1]: (1, H, 1) rows and (1, 1, W) columns."""
    yy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return yy.view(1, h, 1), xx.view(1, 1, w)


def _boxes(u: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """u (B, MAX_BOXES, 5) uniforms -> bool (B, H, W): union of 1-3 boxes."""
    b = u.shape[0]
    size_h = 0.1 + 0.4 * u[..., 0]
    size_w = 0.1 + 0.4 * u[..., 1]
    top = (1 - size_h) * u[..., 2]
    left = (1 - size_w) * u[..., 3]
    count = 1 + (u[:, 0, 4] * _MAX_BOXES).long().clamp_max(_MAX_BOXES - 1)  # per sample
    active = torch.arange(_MAX_BOXES, device=u.device)[None] < count[:, None]  # (B, K)
    t, l_, sh, sw = (v[..., None, None] for v in (top, left, size_h, size_w))
    inside = (yy[:, None] >= t) & (yy[:, None] < t + sh) & (xx[:, None] >= l_) & (xx[:, None] < l_ + sw)
    # a box always covers at least the pixel containing its center
    h, w = yy.shape[1], xx.shape[2]
    cy = ((top + size_h / 2) * h).long().clamp(0, h - 1)
    cx = ((left + size_w / 2) * w).long().clamp(0, w - 1)
    center = (torch.arange(h, device=u.device).view(1, 1, h, 1) == cy[..., None, None]) & (
        torch.arange(w, device=u.device).view(1, 1, 1, w) == cx[..., None, None])
    inside = inside | center
    return (inside & active[..., None, None]).any(dim=1).view(b, h, w)


def _strokes(u: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """u (B, MAX_STROKES, 2*POINTS + 3) uniforms -> bool (B, H, W): thick polylines, drawn
    for half of the samples (1 or 2 strokes)."""
    b, s, _ = u.shape
    pts = u[..., : 2 * _STROKE_POINTS].view(b, s, _STROKE_POINTS, 2)  # (y, x) in [0, 1]
    radius = 0.03 + 0.05 * u[..., 2 * _STROKE_POINTS]  # (B, S)
    count = 1 + (u[:, 0, 2 * _STROKE_POINTS + 1] * _MAX_STROKES).long().clamp_max(_MAX_STROKES - 1)
    use = u[:, 0, 2 * _STROKE_POINTS + 2] < 0.5  # (B,)
    active = (torch.arange(s, device=u.device)[None] < count[:, None]) & use[:, None]
    a, c = pts[:, :, :-1], pts[:, :, 1:]  # segment ends (B, S, P-1, 2)
    py, px = yy[:, None, None], xx[:, None, None]  # (1, 1, 1, H, 1), (1, 1, 1, 1, W)
    ay, ax = a[..., 0, None, None], a[..., 1, None, None]
    dy, dx = (c[..., 0] - a[..., 0])[..., None, None], (c[..., 1] - a[..., 1])[..., None, None]
    length2 = (dy * dy + dx * dx).clamp_min(1e-12)
    proj = (((py - ay) * dy + (px - ax) * dx) / length2).clamp(0, 1)
    dist2 = (py - ay - proj * dy) ** 2 + (px - ax - proj * dx) ** 2  # (B, S, P-1, H, W)
    hit = (dist2 <= radius[..., None, None, None] ** 2).any(dim=2)  # (B, S, H, W)
    return (hit & active[..., None, None]).any(dim=1)


def _ellipse_keep(u: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """u (B, 4) -> bool (B, H, W) True inside the kept subject ellipse (never empty)."""
    ry = 0.2 + 0.1 * u[:, 0]
    rx = 0.2 + 0.1 * u[:, 1]
    cy = 0.4 + 0.2 * u[:, 2]
    cx = 0.4 + 0.2 * u[:, 3]
    v = lambda z: z[:, None, None]
    inside = ((yy - v(cy)) / v(ry)) ** 2 + ((xx - v(cx)) / v(rx)) ** 2 <= 1.0
    h, w = yy.shape[1], xx.shape[2]
    iy = (cy * h).long().clamp(0, h - 1)
    ix = (cx * w).long().clamp(0, w - 1)
    center = (torch.arange(h, device=u.device).view(1, h, 1) == v(iy)) & (
        torch.arange(w, device=u.device).view(1, 1, w) == v(ix))
    return inside | center


def _center_keep(u: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """u (B, 2) -> bool (B, H, W) True inside a centered crop of 50-80% of each side
    (at least 1 pixel, and at least one border row/column regenerated when the size allows)."""
    rows = torch.arange(h, device=u.device).view(1, h, 1)
    cols = torch.arange(w, device=u.device).view(1, 1, w)

    def span(frac: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = (frac * n).round().long().clamp(1, max(1, n - 1))
        start = (n - keep) // 2
        return start, start + keep

    y0, y1 = span(0.5 + 0.3 * u[:, 0], h)
    x0, x1 = span(0.5 + 0.3 * u[:, 1], w)
    v = lambda z: z[:, None, None]
    return (rows >= v(y0)) & (rows < v(y1)) & (cols >= v(x0)) & (cols < v(x1))


def make_edit_mask(batch: int, height: int, width: int, task: str,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Float (B, 1, H, W) edit mask (1 = regenerate, 0 = keep) for ``task`` (see module doc)."""
    if task not in (*EDIT_TASKS, "mixed"):
        raise ValueError(f"unknown edit task {task!r}; expected one of: {', '.join(EDIT_TASKS)}, mixed")
    gdev = generator.device if generator is not None else torch.device("cpu")
    # One fixed draw per call, whatever the task: resumable streams stay aligned.
    u_box = torch.rand(batch, _MAX_BOXES, 5, generator=generator, device=gdev)
    u_stroke = torch.rand(batch, _MAX_STROKES, 2 * _STROKE_POINTS + 3, generator=generator, device=gdev)
    u_ell = torch.rand(batch, 4, generator=generator, device=gdev)
    u_crop = torch.rand(batch, 2, generator=generator, device=gdev)
    u_task = torch.rand(batch, generator=generator, device=gdev)
    yy, xx = _grid(height, width, gdev)
    inpaint = _boxes(u_box, yy, xx) | _strokes(u_stroke, yy, xx)
    outpaint = ~_ellipse_keep(u_ell, yy, xx)
    expand = ~_center_keep(u_crop, height, width)
    if task == "mixed":
        which = (u_task * 3).long().clamp_max(2)[:, None, None]
        regen = torch.where(which == 0, inpaint, torch.where(which == 1, outpaint, expand))
    else:
        regen = {"inpaint": inpaint, "outpaint": outpaint, "expand": expand}[task]
    out = regen[:, None].float()
    return out.to(device) if device is not None else out


def make_edit_batch(latents: torch.Tensor, task: str,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Edit fields of the batch contract for clean ``latents`` (B, C, H, W):
    ``{"edit_mask": (B, 1, H, W) float 1 = regenerate, "edit_source": latents * (1 - mask)}``
    in the latents' dtype and device. ``task``: one of :data:`EDIT_TASKS` or ``"mixed"``."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        raise ValueError("latents must be a (B, C, H, W) tensor")
    b, _, h, w = latents.shape
    mask = make_edit_mask(b, h, w, task, generator, latents.device).to(latents.dtype)
    return {"edit_mask": mask, "edit_source": latents * (1 - mask)}


def edit_model_input(x_t: torch.Tensor, edit_source: torch.Tensor, edit_mask: torch.Tensor) -> torch.Tensor:
    """The model input of an edit config: ``cat([x_t, edit_source, edit_mask], dim=1)``."""
    if edit_source.shape != x_t.shape or edit_mask.shape != (x_t.shape[0], 1, *x_t.shape[2:]):
        raise ValueError(
            f"edit_source must have shape {tuple(x_t.shape)} and edit_mask "
            f"{(x_t.shape[0], 1, *x_t.shape[2:])}; got {tuple(edit_source.shape)} and {tuple(edit_mask.shape)}")
    return torch.cat([x_t, edit_source.to(x_t.dtype), edit_mask.to(x_t.dtype)], dim=1)
