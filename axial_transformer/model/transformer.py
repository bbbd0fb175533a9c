"""The Axial Transformer (Ho, Kalchbrenner, Weissenborn, Salimans 2019, arXiv 1912.12180).

An image x in {0..255}^(C x H x W) is modelled channel after channel, each channel row after row,
each row pixel after pixel:  p(x) = prod_c prod_i prod_j p(x[c,i,j] | x[<c], x[c,<i,:], x[c,i,<j]).
For the channel c being modelled (a "slice"):

  ctx    = channel_encoder(x[<c], c)                 unmasked row/column blocks
  u      = shift_down(outer_decoder(h + pos + ctx))  row i sees rows < i
  r      = inner_decoder(shift_right(h) + u + pos + ctx)   pixel j sees pixels < j of its row
  logits = to_logits(norm(r))

with h = pixel_embedding(x[c]). Axis letters: b batch, c channels, h rows, w columns, d features,
v the 256 pixel values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..hub import HubMixin
from .attention import AttentionPath, Position, set_attention_path
from .blocks import AxialBlock, AxialStack, layer_norm
from .config import AxialTransformerConfig

__all__ = ["AxialTransformer", "AxialTransformerConfig", "shift_down", "shift_right"]


def shift_down(x: Tensor) -> Tensor:
    """[B, H, W, D]: row i takes row i-1, a zero row on top; the last row drops out."""
    return F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1]


def shift_right(x: Tensor) -> Tensor:
    """[B, H, W, D]: column j takes column j-1, a zero column on the left."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def channel_of(x: Tensor, channel: Tensor) -> Tensor:
    """Channel `channel[b]` of each image: [B, C, H, W], [B] -> [B, H, W]."""
    return x.gather(1, channel[:, None, None, None].expand(-1, 1, *x.shape[2:]))[:, 0]


def bits_of(logits: Tensor, x: Tensor) -> Tensor:
    """-log2 of each value's probability: logits [..., V] (fp32 or more), x [...] -> [...]."""
    nats = F.cross_entropy(logits.movedim(-1, 1), x.long(), reduction="none")
    return nats / math.log(2)


def at_least_fp32(logits: Tensor) -> Tensor:
    """The softmax cross-entropy is taken in fp32 (or fp64) even when the logits come in bf16."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def variance_scaling(weight: Tensor, scale: float) -> None:
    """The official `variance_scaling` init (axial/nn.py): truncated normal of variance
    scale / fan_in."""
    fan_in = weight[0].numel()
    # TF's truncated normal keeps +-2 std; 0.8796... restores the intended variance.
    std = math.sqrt(scale / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class AxialTransformer(nn.Module, HubMixin):
    """The model; `save_pretrained`, `from_pretrained` and `push_to_hub` come from `HubMixin`."""

    def __init__(self, config: AxialTransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        (height, width), dim = c.image_size, c.dim
        stack = dict(dim=dim, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)

        # One embedding table shared by every channel (official models.py).
        self.pixel_embedding = nn.Embedding(c.levels, dim)
        # Additively factorised learned positions: pos[i, j] = pos_h[i] + pos_w[j].
        self.pos_h = nn.Parameter(torch.empty(height, 1, dim))
        self.pos_w = nn.Parameter(torch.empty(1, width, dim))

        # Channel encoder ("exterior" in the official code): previous channels as real values plus
        # a one-hot plane of the channel being modelled. A 3x3 conv is safe here because those
        # channels are fully known; it would leak the future inside the decoders.
        self.encoder_input = nn.Conv2d(2 * c.channels, dim, kernel_size=3, padding=1)
        self.encoder_pos_h = nn.Parameter(torch.empty(height, 1, dim))
        self.encoder_pos_w = nn.Parameter(torch.empty(1, width, dim))
        # Class-conditional models: a learned embedding of the image's class, one row more for
        # "no class" (label dropout trains it, classifier-free guidance samples with it). It is
        # added to the channel encoder's input, so it reaches ctx and through ctx the inputs of
        # both decoders: every subpixel's prediction sees it, the first one included.
        self.class_embedding = nn.Embedding(c.num_classes + 1, dim) if c.num_classes else None
        self.channel_encoder = AxialStack(
            axes=[("row", False), ("column", False)] * (c.encoder_layers // 2), **stack
        )
        self.outer_decoder = AxialStack(
            axes=[("row", False), ("column", True)] * (c.outer_layers // 2), **stack
        )
        self.inner_decoder = AxialStack(axes=[("row", True)] * c.inner_layers, **stack)
        self.final_norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, c.levels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialisation (axial/nn.py).

        Dense and conv kernels: variance scaling 1/fan_in, truncated normal; biases zero. Pixel
        embeddings and positions: N(0, (5/sqrt(D))^2) (`emb_init` with scale 5 in transformers.py).
        Output projections of attention and MLP, and the logits layer: variance scale 1e-10, so
        every residual block starts as the identity and an untrained model predicts the uniform
        distribution (8 bits per subpixel).
        """

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                variance_scaling(module.weight, 1.0)
                nn.init.zeros_(module.bias)
        for block in (m for m in self.modules() if isinstance(m, AxialBlock)):
            variance_scaling(block.attn.to_out.weight, 1e-10)
            variance_scaling(block.mlp[-1].weight, 1e-10)
        variance_scaling(self.to_logits.weight, 1e-10)
        std = 5.0 / math.sqrt(self.config.dim)
        embeddings = [self.pixel_embedding.weight, self.pos_h, self.pos_w, self.encoder_pos_h,
                      self.encoder_pos_w]
        if self.class_embedding is not None:
            embeddings.append(self.class_embedding.weight)
        for p in embeddings:
            nn.init.normal_(p, std=std)

    # ----------------------------------------------------------------------------------------
    # Run-time choices: how the same function is computed, never saved with the model.

    def set_gradient_checkpointing(self, enable: bool = True) -> AxialTransformer:
        """Recompute each block's activations in the backward pass: needed to fit the paper's
        ImageNet-64 model on one GPU, costs about a third more compute."""
        for stack in (self.channel_encoder, self.outer_decoder, self.inner_decoder):
            stack.gradient_checkpointing = enable
        return self

    def set_attention(self, path: AttentionPath) -> AxialTransformer:
        """How attention is computed: "sdpa", "matmul" or "auto" (attention.py)."""
        set_attention_path(self, path)
        return self

    # ----------------------------------------------------------------------------------------
    # The three parts, usable one at a time by the sampler.

    def positions(self) -> Tensor:
        return self.pos_h + self.pos_w  # (H, W, D)

    def channel_context(self, x: Tensor, channel: Tensor, labels: Tensor | None = None,
                        frame_context: Tensor | None = None) -> Tensor:
        """ctx for modelling channel `channel[b]` of image `x[b]` (of class `labels[b]`, -1 for
        none, in a class-conditional model): [B, C, H, W] -> [B, H, W, D]. A video model passes
        each frame's `frame_context` [B, H, W, D] (computed from the frames before it), added
        to the encoder's input like the class, so that it too reaches both decoders."""
        planes = torch.arange(self.config.channels, device=x.device)
        known = (planes[None, :] < channel[:, None])[:, :, None, None]  # channels < c
        values = (x.to(self.encoder_input.weight.dtype) / (self.config.levels - 1)) * known
        one_hot = (planes[None, :] == channel[:, None])[:, :, None, None].expand_as(values)
        planes = torch.cat([values, one_hot.to(values.dtype)], dim=1)
        # Channels-last convolution, so that its output seen as [B, H, W, D] is contiguous: a
        # permuted view would carry its layout into every residual add of the encoder, and each
        # layer norm would copy it.
        ctx = self.encoder_input(planes.contiguous(memory_format=torch.channels_last))
        ctx = rearrange(ctx, "b d h w -> b h w d") + self.encoder_pos_h + self.encoder_pos_w
        if self.class_embedding is not None:
            # -1 ("no class") takes the last row.
            ctx = ctx + self.class_embedding(labels % (self.config.num_classes + 1))[:, None, None]
        if frame_context is not None:
            ctx = ctx + frame_context
        return self.channel_encoder(ctx)

    def logits(self, r: Tensor) -> Tensor:
        return F.linear(layer_norm(r, self.final_norm), self.to_logits.weight, self.to_logits.bias)

    # ----------------------------------------------------------------------------------------
    # Decoding one row and one subpixel at a time, through the blocks' own forward with
    # key/value caches: the steps of the sampler's loop (decoding.decode).

    def new_caches(self, batch: int, like: Tensor) -> tuple[list, list]:
        """Zeroed key/value caches of the outer decoder (over rows, for each column of each
        image) and of the inner decoder (over the columns of the row being decoded)."""
        height, width = self.config.image_size
        return (self.outer_decoder.new_caches(batch * width, height, like),
                self.inner_decoder.new_caches(batch, width, like))

    def outer_step(self, inputs: Tensor, caches: list, row: Position) -> Tensor:
        """Row i's outer-decoder inputs h + pos + ctx [B, W, D] -> the outer decoder's output
        for row i [B, W, D], which shift_down hands to row i + 1."""
        return self.outer_decoder.step(inputs[:, None], caches, row)[:, 0]

    def inner_step(self, inputs: Tensor, caches: list, column: Position) -> Tensor:
        """Pixel j's inner-decoder input shift_right(h) + u + pos + ctx [B, D] -> its logits
        [B, V] given every subpixel before it."""
        r = self.inner_decoder.step(inputs[:, None, None], caches, column)
        return self.logits(r[:, 0, 0])

    def slice_logits(self, x: Tensor, channel: Tensor, labels: Tensor | None = None,
                     frame_context: Tensor | None = None) -> Tensor:
        """Teacher-forced logits of channel `channel[b]` of each image: [B, C, H, W], [B] ->
        [B, H, W, V] (`frame_context`: see `channel_context`)."""
        ctx = self.channel_context(x, channel, labels, frame_context)
        h = self.pixel_embedding(channel_of(x, channel).long())
        pos = self.positions()
        u = shift_down(self.outer_decoder(h + pos + ctx))
        r = self.inner_decoder(shift_right(h) + u + pos + ctx)
        return self.logits(r)

    # ----------------------------------------------------------------------------------------
    # Public API.

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits of every subpixel given its past: [B, C, H, W] integers -> [B, C, H, W, 256].
        A class-conditional model takes the images' classes, `labels` [B] (-1: no class)."""
        self.check_images(x)
        labels = self.check_labels(labels, x)
        b, c = x.shape[:2]
        x_rep = repeat(x, "b c h w -> (b k) c h w", k=c)  # one copy per slice
        channel = torch.arange(c, device=x.device).repeat(b)
        labels_rep = None if labels is None else labels.repeat_interleave(c)
        logits = self.slice_logits(x_rep, channel, labels_rep)
        return rearrange(logits, "(b c) h w v -> b c h w v", b=b)

    def subpixel_bits(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """-log2 p(x[c,i,j] | past) of each subpixel: [B, C, H, W] -> [B, C, H, W], fp32 or more."""
        return bits_of(at_least_fp32(self(x, labels)), x)

    def bits_per_dim(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact bits/dim of each image, every channel scored: [B, C, H, W] -> [B]."""
        return self.subpixel_bits(x, labels).flatten(1).mean(1)

    def loss(
        self,
        x: Tensor,
        objective: str = "random",
        generator: torch.Generator | None = None,
        channel: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Mean training loss in bits/dim.

        objective "all" scores every channel. "random" (the official objective) scores ONE
        channel per image, drawn uniformly (or given as `channel` [B]): an unbiased estimate of
        bits/dim, since bits/dim is the mean of the channels' bits, at 1/C of the decoder compute.
        """
        if objective == "all":
            return self.subpixel_bits(x, labels).mean()
        if objective != "random":
            raise ValueError(f"objective must be 'random' or 'all', got {objective!r}")
        self.check_images(x)
        labels = self.check_labels(labels, x)
        if channel is None:
            channel = torch.randint(self.config.channels, (x.shape[0],), generator=generator,
                                    device=generator.device if generator else "cpu")
        channel = channel.to(x.device)
        logits = at_least_fp32(self.slice_logits(x, channel, labels))
        nats = F.cross_entropy(rearrange(logits, "b h w v -> b v h w"),
                               channel_of(x, channel).long())
        return nats / math.log(2)

    @torch.no_grad()
    def sample(self, num_samples: int, **kwargs) -> Tensor:
        """Draw images row by row with cached decoding; see `axial_transformer.sampling.sample`."""
        from ..sampling.sampler import sample

        return sample(self, num_samples, **kwargs)

    def check_images(self, x: Tensor) -> None:
        c, (h, w) = self.config.channels, self.config.image_size
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor of pixel values, got {type(x).__name__}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(
                f"expected integer pixel values 0..255 (e.g. uint8), got a {x.dtype} tensor; "
                "the model is discrete: pass the raw pixels, not normalised floats"
            )
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"expected images of shape [B, {c}, {h}, {w}], got {list(x.shape)}")
        if x.dtype == torch.uint8 and self.config.levels == 256:
            return  # every value fits: no need to read them (a host sync on a GPU)
        if torch.compiler.is_compiling():
            return  # reading values would break the graph; the eager calls check them
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.config.levels):
            raise ValueError(
                f"pixel values must lie in 0..{self.config.levels - 1}, "
                f"got {int(x.min())}..{int(x.max())}"
            )

    def check_labels(self, labels: Tensor | None, x: Tensor) -> Tensor | None:
        """The classes [B] of a class-conditional model's images (-1: no class), on x's device;
        a ValueError that says what was expected otherwise."""
        k = self.config.num_classes
        if k == 0:
            if labels is not None:
                raise ValueError("this model is not class-conditional (num_classes=0): "
                                 "pass no labels")
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional: pass labels [B] in 0..{k - 1} "
                             "(-1 for no class)")
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or \
                labels.dtype == torch.bool or tuple(labels.shape) != (x.shape[0],):
            raise ValueError(f"labels must be an integer tensor of shape [{x.shape[0]}], got "
                             f"{labels.dtype if isinstance(labels, Tensor) else type(labels)} "
                             f"{list(getattr(labels, 'shape', []))}")
        if not torch.compiler.is_compiling() and labels.numel() and \
                (int(labels.min()) < -1 or int(labels.max()) >= k):
            raise ValueError(f"labels must lie in 0..{k - 1} (-1: no class), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return labels.to(x.device, torch.long)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def model_class_for(cls, config: AxialTransformerConfig) -> type[nn.Module]:
        """The class that `from_pretrained` builds for a saved config: AxialTransformer loads
        image and video models alike (a video export gives a VideoTransformer)."""
        if config.frames:
            from .video import VideoTransformer

            return VideoTransformer
        return cls
