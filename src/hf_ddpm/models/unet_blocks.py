"""The building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B): the sinusoidal timestep embedding, residual
blocks, self-attention, resampling and the per-resolution levels that `DDPMUNet` stacks.

Module and parameter names mirror diffusers' `UNet2DModel` blocks one to one, so that checkpoints convert by renaming
state-dict keys only (`diffusers_conversion.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttnBlock", "DownLevel", "Downsample", "MidBlock", "ResBlock", "TimestepEmbed", "UpLevel", "Upsample",
    "norm_silu", "timestep_embedding",
]  # fmt: skip


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    freq_shift: float = 1.0,
    flip_sin_to_cos: bool = False,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, `[N] -> [N, dim]` in float32.

    `freq_shift=1, flip_sin_to_cos=False` is the DDPM code's convention (`sin` half first, frequencies
    `exp(-log(max_period) * i / (dim/2 - 1))`); the op order follows diffusers' `get_timestep_embedding` so that
    converted models agree bit for bit. The frequencies are recomputed per call (microseconds) rather than kept as a
    buffer, because `model.to(torch.bfloat16)` would cast a buffer and lose their precision.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _silu(h: torch.Tensor) -> torch.Tensor:
    """SiLU, in place (no new buffer) when autograd does not record it; under autograd an in-place SiLU would only
    make autograd clone its input, which its backward reads."""
    return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _silu(norm(x))


class TimestepEmbed(nn.Module):
    """`t: [N] -> [N, 4 * base_channels]`: sinusoids (dim `base_channels`), Linear, SiLU, Linear (paper, App. B)."""

    def __init__(self, base_channels: int, freq_shift: float, flip_sin_to_cos: bool):
        super().__init__()
        self.dim, self.freq_shift, self.flip_sin_to_cos = base_channels, freq_shift, flip_sin_to_cos
        self.linear_1 = nn.Linear(base_channels, 4 * base_channels)
        self.linear_2 = nn.Linear(4 * base_channels, 4 * base_channels)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.dim, self.freq_shift, self.flip_sin_to_cos)
        return self.linear_2(F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype))))


class ResBlock(nn.Module):
    """`x: [N, C_in, H, W], emb: [N, E] -> [N, C_out, H, W]`; `emb` is the SiLU-activated time embedding.

    GroupNorm, SiLU, conv3x3, + Linear(emb) (or FiLM `norm(h) * (1 + scale) + shift` with `scale_shift`, Nichol &
    Dhariwal 2021), GroupNorm, SiLU, dropout, conv3x3; 1x1 conv on the skip path when channels change.
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, groups: int, eps: float, scale_shift: bool
    ):
        super().__init__()
        self.dropout, self.scale_shift = dropout, scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        t = self.temb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            # Out of place `*` keeps norm2's memory format; `add_` is safe as mul's backward reads only its inputs.
            h = _silu((self.norm2(h) * (1 + scale)).add_(shift))
        else:
            # In place is safe: a conv's backward reads its input and weight, never its output.
            h = norm_silu(self.norm2, h.add_(t))
        if self.dropout > 0 and self.training:
            h = F.dropout(h, self.dropout, training=True, inplace=True)  # SiLU's backward reads its input only
        h = self.conv2(h)
        return h.add_(x if self.skip is None else self.skip(x))


class AttnBlock(nn.Module):
    """Self-attention over the `H * W` positions, `[N, C, H, W] -> [N, C, H, W]`, with a residual connection.

    q, k, v and the output projection are Linear layers over channels (the paper's NIN layers), so the attention
    runs on `[N, H*W, C]` tokens; when `x` is channels_last that token view costs no copy.
    """

    def __init__(self, ch: int, num_heads: int, groups: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q, self.k, self.v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        to_tokens = lambda t: t.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # noqa: E731
        tokens = to_tokens(self.norm(x))
        q, k, v = (f(tokens).view(n, hh * ww, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as the paper's C^-1/2 for one head
        h = self.proj_out(h.transpose(1, 2).reshape(n, hh * ww, c))
        # Residual added in place on the Linear output itself, not on a view of it: an in-place op on a view makes
        # autograd clone the whole gradient in backward (CopySlices).
        return h.add_(to_tokens(x)).view(n, hh, ww, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """`[N, C, H, W] -> [N, C, H/2, W/2]`: stride-2 conv3x3, or 2x2 average pooling without conv."""

    def __init__(self, ch: int, with_conv: bool, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # TF "SAME" at stride 2 pads right/bottom only, as the paper's code
        return self.conv(x)


class Upsample(nn.Module):
    """`[N, C, H, W] -> [N, C, 2H, 2W]`: nearest-neighbour upsampling, then conv3x3 if `with_conv`."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Level(nn.Module):
    """Shared by the levels: diffusers' `enable_gradient_checkpointing()` sets `gradient_checkpointing` and
    `_gradient_checkpointing_func` on every module that has the attribute."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)


class DownLevel(_Level):
    """One resolution of the down path: `[N, C_in, H, W] -> [N, C, H/2, W/2]` (no downsampling at the last level),
    also returning every block's output `[N, C, ., .]` for the skip connections."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_blocks: int,
        attn: bool,
        down: Downsample | None,
        res_kw: dict,
        attn_kw: dict,
    ):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, **res_kw) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, **attn_kw) for _ in range(num_blocks)) if attn else None
        self.downsample = down

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, res in enumerate(self.res):
            h = self._run(res, h, emb)
            if self.attn is not None:
                h = self._run(self.attn[i], h)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h, skips


class MidBlock(_Level):
    """`[N, C, H, W] -> [N, C, H, W]`: ResBlock, self-attention, ResBlock at the lowest resolution."""

    def __init__(self, ch: int, res_kw: dict, attn_kw: dict):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(ch, ch, **res_kw) for _ in range(2))
        self.attn = AttnBlock(ch, **attn_kw)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._run(self.res[0], h, emb)
        h = self._run(self.attn, h)
        return self._run(self.res[1], h, emb)


class UpLevel(_Level):
    """One resolution of the up path: `num_blocks + 1` ResBlocks, each on `cat([h, skip], 1)`, then upsampling
    (not at the last level): `[N, C_prev, H, W] -> [N, C, 2H, 2W]`."""

    def __init__(
        self,
        in_ch: int,
        skip_chs: list[int],
        out_ch: int,
        attn: bool,
        up: Upsample | None,
        res_kw: dict,
        attn_kw: dict,
    ):
        super().__init__()
        chs = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.res = nn.ModuleList(ResBlock(c + s, out_ch, **res_kw) for c, s in zip(chs, skip_chs))
        self.attn = nn.ModuleList(AttnBlock(out_ch, **attn_kw) for _ in skip_chs) if attn else None
        self.upsample = up

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = self._run(res, torch.cat([h, skips.pop()], dim=1), emb)
            if self.attn is not None:
                h = self._run(self.attn[i], h)
        return h if self.upsample is None else self.upsample(h)
