"""The video model: the Axial Transformer over clips x in {0..255}^(C x T x H x W).

A clip is generated frame after frame, each frame as the image model generates an image
(channel, row, pixel), given a context computed from the frames before it:

  p(x) = prod_t prod_c prod_i prod_j p(x[c,t,i,j] | x[:,<t], x[<c,t], x[c,t,<i,:], x[c,t,i,<j])

  g_t    = motion_compensated(x[:, t-1], x[:, t-2])    a guess of frame t under constant motion
  f_t    = frame_input(x[:, t-1], x[:, t-2], g_t) + pos_t + pos_h + pos_w    earlier frames only
  c      = frame_encoder(f)        unmasked row/column blocks in each frame, masked time blocks
  frame t is decoded by the image model with c_t added to its channel encoder's input, and
  guess_prior[t, |v - g_t|] added to the logits of each subpixel's values v

The paper applies its construction to video (BAIR Robot Pushing); this frame encoder, which
gives each frame its context the way the channel encoder gives each channel its, is this
toolkit's generalisation of the image model by one axis (docs/model.md, "Video").
Axis letters: b batch, c channels, t frames, h rows, w columns, d features, v pixel values.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..hub import HubMixin
from .attention import AttentionPath, Position, set_attention_path
from .blocks import AxialBlock, AxialStack
from .config import FRAME_LAYERS, AxialTransformerConfig
from .transformer import AxialTransformer, at_least_fp32, bits_of, channel_of, variance_scaling

__all__ = ["VideoTransformer", "build_model"]

# Frames before frame t that its encoder input sees directly as pixels; the masked time blocks
# reach every earlier frame. Two frames show motion and its direction.
PAST_FRAMES = 2
# The input conv's kernel: slot t sees motion of up to one pixel per frame directly, the row
# and column attention any further; 3x3 is also the channel encoder's conv (official models.py).
FRAME_KERNEL = 3
# The motion-compensated guess (`motion_compensated`): offsets of up to MOTION_RADIUS pixels a
# frame along each axis, each judged over a MATCH_WINDOW x MATCH_WINDOW neighbourhood, about the
# size of a stroke: of 3, 5, 7 and 9, 5 guessed the moving digits' next frames best
# (`bench/video_bench.py --parts motion`: 11.5 mean absolute error, copying frame t-1 29.4).
MOTION_RADIUS = 1
MATCH_WINDOW = 5
# The guess's prior on frame t's logits: a learned weight per frame for each distance |v - g|
# between a value v and the guessed value g, up to this many levels apart (farther ones share
# the last weight). It lets the model copy the guess from its first steps, where reaching the
# logits through the frame encoder and both decoders is learned slowly (docs/model.md).
PRIOR_DISTANCES = 32
# The axes of a frame encoder map [B, T, H, W, D] (a row attends along W, a column along H).
TIME, COLUMN, ROW = 0, 1, 2


def build_model(config: AxialTransformerConfig) -> nn.Module:
    """A VideoTransformer when `config.frames` > 0, an AxialTransformer otherwise."""
    return VideoTransformer(config) if config.frames else AxialTransformer(config)


class VideoTransformer(nn.Module, HubMixin):
    """The video model; the same public API as AxialTransformer over clips [B, C, T, H, W]."""

    def __init__(self, config: AxialTransformerConfig) -> None:
        super().__init__()
        if not config.frames:
            raise ValueError("VideoTransformer needs frames > 0; an image model (frames=0) is "
                             "an AxialTransformer (build_model picks the class)")
        self.config = config
        c = config
        (height, width), dim = c.image_size, c.dim
        # Each frame is decoded by the image model's parts (embedding, channel encoder, outer
        # and inner decoders, logits), shared by every frame.
        self.image = AxialTransformer(
            dataclasses.replace(c, frames=0, frame_layers=FRAME_LAYERS)
        )
        # Slot t's input is built only from frames t-1 and t-2 (real values, zeros before the
        # clip starts), so slot t is causal by construction: after the masked time blocks, which
        # see slots <= t, it still holds only frames < t, and no shift is needed (unlike the
        # decoders, whose input holds the current pixel).
        self.frame_input = nn.Conv2d((PAST_FRAMES + 1) * c.channels, dim, FRAME_KERNEL,
                                     padding=FRAME_KERNEL // 2)
        self.frame_pos_t = nn.Parameter(torch.empty(c.frames, 1, 1, dim))
        # Zeros: an untrained model's logits are the image model's alone.
        self.guess_prior = nn.Parameter(torch.zeros(c.frames, PRIOR_DISTANCES))
        self.frame_pos_h = nn.Parameter(torch.empty(height, 1, dim))
        self.frame_pos_w = nn.Parameter(torch.empty(1, width, dim))
        self.frame_encoder = AxialStack(
            dim=dim, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout,
            axes=[(ROW, False), (COLUMN, False), (TIME, True)] * (c.frame_layers // 3),
        )
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The frame encoder's, as `AxialTransformer.initialize_weights` (official axial/nn.py):
        fan-in scaling, residual outputs at variance scale 1e-10, positions N(0, (5/sqrt(D))^2).
        The image model initialised its own parts."""
        for module in (self.frame_input, *self.frame_encoder.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                variance_scaling(module.weight, 1.0)
                nn.init.zeros_(module.bias)
        for block in (m for m in self.frame_encoder.modules() if isinstance(m, AxialBlock)):
            variance_scaling(block.attn.to_out.weight, 1e-10)
            variance_scaling(block.mlp[-1].weight, 1e-10)
        for p in (self.frame_pos_t, self.frame_pos_h, self.frame_pos_w):
            nn.init.normal_(p, std=5.0 / math.sqrt(self.config.dim))

    # ----------------------------------------------------------------------------------------
    # Run-time choices, as on AxialTransformer.

    def set_gradient_checkpointing(self, enable: bool = True) -> VideoTransformer:
        self.image.set_gradient_checkpointing(enable)
        self.frame_encoder.gradient_checkpointing = enable
        return self

    def set_attention(self, path: AttentionPath) -> VideoTransformer:
        set_attention_path(self, path)
        return self

    # ----------------------------------------------------------------------------------------
    # The frame encoder, whole (training) or one slot at a time (sampling).

    def past_frames(self, x: Tensor, t: int | None = None) -> Tensor:
        """Frames t-1 .. t-PAST_FRAMES as values in [0, 1], zeros before the clip starts:
        [B, C, T, H, W] -> [B * T, K * C, H, W] for every slot, or [B, K * C, H, W] for slot t."""
        values = x.to(self.frame_input.weight.dtype) / (self.config.levels - 1)
        frames = values.shape[2]
        if t is None:
            past = [F.pad(values, (0, 0, 0, 0, k, 0))[:, :, :frames]
                    for k in range(1, PAST_FRAMES + 1)]
            return rearrange(torch.cat(past, 1), "b k t h w -> (b t) k h w")
        past = [values[:, :, t - k] if t >= k else torch.zeros_like(values[:, :, 0])
                for k in range(1, PAST_FRAMES + 1)]
        return torch.cat(past, 1)

    def frame_inputs(self, past: Tensor) -> tuple[Tensor, Tensor]:
        """Frames t-1, t-2 [N, K * C, H, W] -> the conv's output over them and frame t's
        motion-compensated guess, [N, H, W, D], plus the row/column positions; and the guess
        as pixel values [N, C, H, W] (long)."""
        last, before = past.split(self.config.channels, 1)
        guess = motion_compensated(last, before)
        planes = torch.cat([past, guess], 1)
        f = self.frame_input(planes.contiguous(memory_format=torch.channels_last))
        values = (guess * (self.config.levels - 1)).round().long()
        return rearrange(f, "n d h w -> n h w d") + self.frame_pos_h + self.frame_pos_w, values

    def prior_table(self) -> Tensor:
        """Every (frame t, guessed value g) pair's prior over the values, [T * V, V]: row
        t * V + g holds `guess_prior[t]` at each value's distance from g."""
        values = torch.arange(self.config.levels, device=self.guess_prior.device)
        distance = (values - values[:, None]).abs().clamp(max=PRIOR_DISTANCES - 1)
        return self.guess_prior[:, distance].flatten(0, 1)

    def prior(self, guess: Tensor, t: Tensor | int) -> Tensor:
        """Frame t's prior on the logits from its guessed values: guess [...] (long) ->
        [..., V]. `t` broadcasts against guess (an int, or frame indices shaped like it). The
        sampler looks up the same rows inside its compiled step (`decoding.decode`)."""
        # One table row per subpixel: an embedding lookup, whose backward is cheap; indexing
        # guess_prior by every subpixel's value distances made a training step 12% slower.
        return F.embedding(self.prior_rows(guess, t), self.prior_table())

    def prior_rows(self, guess: Tensor, t: Tensor | int) -> Tensor:
        """The `prior_table` row of each guessed value of frame t: guess [...] (long) -> [...]."""
        return guess + self.config.levels * torch.as_tensor(t, device=guess.device)

    def frame_context(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The context of every frame from the frames before it, and each frame's guess:
        [B, C, T, H, W] -> [B, T, H, W, D], [B, C, T, H, W] (long)."""
        f, guess = self.frame_inputs(self.past_frames(x))
        f = rearrange(f, "(b t) h w d -> b t h w d", b=x.shape[0])
        guess = rearrange(guess, "(b t) c h w -> b c t h w", b=x.shape[0])
        return self.frame_encoder(f + self.frame_pos_t), guess

    def new_frame_caches(self, batch: int, like: Tensor) -> list:
        """Key/value caches of the masked time blocks, over the frames, for each (row, column)
        of each clip."""
        height, width = self.config.image_size
        return self.frame_encoder.new_caches(batch * height * width, self.config.frames, like)

    def frame_step(self, x: Tensor, t: int, caches: list, time: Position
                   ) -> tuple[Tensor, Tensor]:
        """Frame t's context [B, H, W, D] and guess [B, C, H, W] from the frames before it in
        the canvas x: its row and column blocks run on that one slot, its time blocks attend
        through the caches."""
        f, guess = self.frame_inputs(self.past_frames(x, t))
        context = self.frame_encoder.step((f + self.frame_pos_t[t])[:, None], caches, time)
        return context[:, 0], guess

    def frame_slice_logits(self, x: Tensor, channel: Tensor) -> Tensor:
        """Teacher-forced logits of channel `channel[b, t]` of each frame: [B, C, T, H, W],
        [B, T] -> [B, T, H, W, V]."""
        b, frames = x.shape[0], x.shape[2]
        context, guess = self.frame_context(x)
        by_frame = lambda y: rearrange(y, "b c t h w -> (b t) c h w")
        channel = channel.flatten()
        logits = self.image.slice_logits(by_frame(x), channel, None,
                                         rearrange(context, "b t h w d -> (b t) h w d"))
        t = torch.arange(frames, device=x.device).repeat(b)[:, None, None]
        logits = logits + self.prior(channel_of(by_frame(guess), channel), t)
        return rearrange(logits, "(b t) h w v -> b t h w v", b=b)

    # ----------------------------------------------------------------------------------------
    # Public API, as AxialTransformer's.

    def forward(self, x: Tensor) -> Tensor:
        """Logits of every subpixel given its past: [B, C, T, H, W] integers ->
        [B, C, T, H, W, V]. The frame encoder runs once; each frame's channel slices share it."""
        self.check_images(x)
        b, c, frames = x.shape[:3]
        context, guess = self.frame_context(x)
        context = repeat(context, "b t h w d -> (b t k) h w d", k=c)
        images = repeat(x, "b c t h w -> (b t k) c h w", k=c)  # one copy per slice
        channel = torch.arange(c, device=x.device).repeat(len(images) // c)
        logits = self.image.slice_logits(images, channel, None, context)
        logits = rearrange(logits, "(b t c) h w v -> b c t h w v", b=b, c=c)
        return logits + self.prior(guess, torch.arange(frames, device=x.device)[:, None, None])

    def subpixel_bits(self, x: Tensor) -> Tensor:
        """-log2 p(x[c,t,i,j] | past): [B, C, T, H, W] -> [B, C, T, H, W], fp32 or more."""
        return bits_of(at_least_fp32(self(x)), x)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """Exact bits/dim of each clip, every subpixel scored: [B, C, T, H, W] -> [B]."""
        return self.subpixel_bits(x).flatten(1).mean(1)

    def loss(
        self,
        x: Tensor,
        objective: str = "random",
        generator: torch.Generator | None = None,
        channel: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Mean training loss in bits/dim. "all" scores every subpixel; "random" (the official
        objective, per frame) scores ONE channel of each frame of each clip, drawn uniformly
        (or given as `channel` [B, T]): unbiased, since a frame's bits/dim is the mean of its
        channels', at 1/C of the decoder compute."""
        self.image.check_labels(labels, x)  # refuses labels: no class-conditional video
        if objective == "all":
            return self.subpixel_bits(x).mean()
        if objective != "random":
            raise ValueError(f"objective must be 'random' or 'all', got {objective!r}")
        self.check_images(x)
        b, frames = x.shape[0], x.shape[2]
        if channel is None:
            channel = torch.randint(self.config.channels, (b, frames), generator=generator,
                                    device=generator.device if generator else "cpu")
        channel = channel.to(x.device)
        logits = at_least_fp32(self.frame_slice_logits(x, channel))
        target = x.gather(1, channel[:, None, :, None, None].expand(-1, 1, -1, *x.shape[3:]))
        nats = F.cross_entropy(rearrange(logits, "b t h w v -> b v t h w"), target[:, 0].long())
        return nats / math.log(2)

    @torch.no_grad()
    def sample(self, num_samples: int, **kwargs) -> Tensor:
        """Draw clips frame by frame with cached decoding -> uint8 [B, C, T, H, W]; see
        `axial_transformer.sampling.sample` (known/known_mask and noise take clip shapes)."""
        from ..sampling.sampler import sample

        return sample(self, num_samples, **kwargs)

    def check_images(self, x: Tensor) -> None:
        c, t, (h, w) = self.config.channels, self.config.frames, self.config.image_size
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor of pixel values, got {type(x).__name__}")
        if x.ndim != 5 or tuple(x.shape[1:]) != (c, t, h, w):
            raise ValueError(f"expected clips of shape [B, C, T, H, W] = [B, {c}, {t}, {h}, {w}], "
                             f"got {list(x.shape)}")
        self.image.check_images(rearrange(x, "b c t h w -> (b t) c h w"))  # dtype and values

    def check_labels(self, labels: Tensor | None, x: Tensor) -> None:
        return self.image.check_labels(labels, x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def model_class_for(cls, config: AxialTransformerConfig) -> type[nn.Module]:
        if not config.frames:
            raise ValueError("this is an image model (frames=0): load it with "
                             "AxialTransformer.from_pretrained")
        return cls


def motion_compensated(last: Tensor, before: Tensor) -> Tensor:
    """A guess of frame t from frames t-1 and t-2 [N, C, H, W] under constant motion, as a video
    codec's block matching makes one: pixel p copies frame t-1 at p + o, for the offset o (each
    axis within MOTION_RADIUS) along which the two frames agree best around p, frame t-1 at
    p + o against frame t-2 at p + 2o, by mean absolute difference over the channels and a
    MATCH_WINDOW square. Standing still (o = 0) wins ties, so still and empty parts are copied.
    Built from frames < t only, like the rest of slot t's input; it gives the frame encoder the
    shift of each pixel directly, which its 3x3 conv alone learned slowly (docs/model.md)."""
    n, c, h, w = last.shape
    k = 2 * MOTION_RADIUS + 1
    shifted = F.unfold(last, k, padding=MOTION_RADIUS).view(n, c, k * k, h, w)  # last at p + o
    twice = F.unfold(before, k, dilation=2, padding=2 * MOTION_RADIUS).view(n, c, k * k, h, w)
    mismatch = (shifted - twice).abs().mean(1)  # [N, k*k, H, W]
    cost = F.avg_pool2d(mismatch, MATCH_WINDOW, 1, MATCH_WINDOW // 2, count_include_pad=False)
    still = k * k // 2
    best = cost.min(1, keepdim=True)
    pick = torch.where(cost[:, still : still + 1] == best.values, still, best.indices)
    return shifted.gather(2, pick[:, None].expand(n, c, 1, h, w))[:, :, 0]
