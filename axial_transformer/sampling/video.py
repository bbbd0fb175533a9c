"""Drawing clips from the video model: the cached sampler, its naive reference, and the known
first frames of a prediction task (BAIR: the first frames given, the rest drawn).

Both samplers go frame by frame, and within a frame in the image model's order, drawing each
subpixel by Gumbel-max from the noise of `Request.gumbel_rows` in (frame, channel, row) order:
from the same noise or seed they return IDENTICAL clips. The cached sampler costs about one
teacher-forced forward pass: per frame t, the frame encoder advances by one slot (its row and
column blocks on frame t alone, its masked time blocks through key/value caches over the
frames), and `decoding.decode` decodes frame t with that context, eagerly or (compile=True) with
the image model's compiled steps, one pair of graphs for every frame. Known frames are encoded,
not decoded.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..model.attention import decoding_positions
from ..model.decoding import decode, decoding_mode
from ..model.transformer import at_least_fp32
from ..model.video import VideoTransformer
from .request import Request
from .sampler import GumbelMax, kept, pixels

__all__ = ["draw_video_cached", "draw_video_naive", "given_frames"]


def given_frames(first: Tensor, frames: int) -> dict[str, Tensor]:
    """`known` and `known_mask` for clips of `frames` frames whose first k are given:
    first [B, C, k, H, W] -> keyword arguments of `sample`. The given frames are a prefix of the
    model's order, so the rest are drawn exactly from the model given them."""
    if not isinstance(first, Tensor) or first.ndim != 5 or not 0 < first.shape[2] <= frames:
        raise ValueError(f"expected the first frames as [B, C, k, H, W] with 1 <= k <= {frames}, "
                         f"got {list(getattr(first, 'shape', []))}")
    b, c, k, h, w = first.shape
    known = first.new_zeros((b, c, frames, h, w))
    known[:, :, :k] = first
    mask = torch.zeros((b, c, frames, h, w), dtype=torch.bool, device=first.device)
    mask[:, :, :k] = True
    return {"known": known, "known_mask": mask}


def draw_video_cached(model: VideoTransformer, r: Request) -> Tensor:
    x, mask, rows, _, autocast = r.start(model)  # x [B, C, T, H, W]
    # Rows whose every pixel is known are not decoded (as for images): a known frame costs only
    # its frame-encoder slot.
    skip = None if mask is None or r.on_logits is not None else mask.all(0).all(-1).tolist()
    c = model.config.channels
    with decoding_mode(model, x, autocast, r.compile):
        like = model.frame_pos_t
        if torch.is_autocast_enabled(x.device.type):
            like = like.to(torch.get_autocast_dtype(x.device.type))
        caches = model.new_frame_caches(len(x), like)
        times = decoding_positions(model.config.frames, like)
        table = model.prior_table()
        # One bar over the frames, not one over the rows of each frame.
        for t, time in enumerate(tqdm(times, desc="decoding", unit="frame",
                                      disable=not r.progress)):
            context, guess = model.frame_step(x, t, caches, time)  # frames < t are in x
            prior = (model.prior_rows(guess, t), table)
            keep = kept(None if mask is None else mask[:, :, t], x[:, :, t], r.compile)
            choose = GumbelMax(rows, r.temperature, keep, x.device)
            frame_skip = None if skip is None else [skip[ci][t] for ci in range(c)]
            on_logits = None
            if r.on_logits is not None:
                on_logits = lambda ci, i, j, logits, t=t: r.on_logits(t, ci, i, j, logits)
            # x[:, :, t] is a view: decode writes frame t's pixels into the clip canvas.
            decode(model.image, x[:, :, t], choose, None, frame_skip, on_logits,
                   compile=r.compile, frame_context=context, frame_prior=prior)
    return pixels(x, model.config.levels)


def draw_video_naive(model: VideoTransformer, r: Request) -> Tensor:
    """The definition: one teacher-forced forward pass over the clip per subpixel."""
    x, mask, rows, _, autocast = r.start(model)
    c, frames, (h, w) = model.config.channels, model.config.frames, model.config.image_size
    with decoding_mode(model, x, autocast):
        for t in range(frames):
            for ci in range(c):
                channel = torch.full((len(x), frames), ci, device=x.device)
                for i in range(h):
                    gumbel = next(rows)
                    for j in range(w):
                        logits = at_least_fp32(model.frame_slice_logits(x, channel)[:, t, i, j])
                        if r.on_logits is not None:
                            r.on_logits(t, ci, i, j, logits)
                        drawn = (logits.to(gumbel.dtype) / r.temperature + gumbel[:, j]).argmax(-1)
                        if mask is not None:
                            drawn = torch.where(mask[:, ci, t, i, j], x[:, ci, t, i, j], drawn)
                        x[:, ci, t, i, j] = drawn
    return pixels(x, model.config.levels)
