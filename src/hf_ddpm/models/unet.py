"""The U-Net of DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239, Appendix B) as a diffusers model.

A PixelCNN++-style U-Net: `num_res_blocks` residual blocks per resolution level, GroupNorm, SiLU, a sinusoidal
timestep embedding added inside every residual block, single-head self-attention at chosen resolutions (16x16 in
the paper) and in the middle, skip connections from every down-path block to the up path.

The module tree is laid out so that diffusers' `UNet2DModel` (DownBlock2D / AttnDownBlock2D / UpBlock2D /
AttnUpBlock2D, the `google/ddpm-*` checkpoints) converts by renaming state-dict keys only: same tensors, same shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..loading import check_local_component

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["DDPMUNet", "DDPMUNetOutput", "GOOGLE_DDPM_CIFAR10_UNET2D", "UNET_PRESETS", "timestep_embedding"]


# Presets. Parameter counts are exact (checked in tests/test_unet.py), for in_channels = out_channels = 3.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's CIFAR-10 model: 35,746,307 parameters ("35.7M", Ho et al. 2020, Appendix B).
    "ddpm-cifar10": dict(
        sample_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    ),
    # The paper's CelebA-HQ / LSUN 256x256 model: 113,673,219 parameters ("114M").
    "ddpm-celebahq-256": dict(
        sample_size=256,
        base_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.0,
    ),
    # CPU-sized: 16x16 (e.g. the 8x8 sklearn digits upscaled), 1,113,955 parameters.
    "tiny-16": dict(
        sample_size=16,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        dropout=0.0,
        num_groups=8,
    ),
    # CPU-sized 32x32: 6,472,195 parameters.
    "small-32": dict(
        sample_size=32,
        base_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        num_groups=16,
    ),
}


# The `UNet2DModel` config of google/ddpm-cifar10-32 (its config.json: the keys that define the model), the diffusers
# form of the `ddpm-cifar10` preset: `DDPMUNet.from_diffusers_unet(UNet2DModel(**GOOGLE_DDPM_CIFAR10_UNET2D))`.
GOOGLE_DDPM_CIFAR10_UNET2D: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_eps=1e-6,
    norm_num_groups=32,
    freq_shift=1,
    flip_sin_to_cos=False,
    time_embedding_type="positional",
    resnet_time_scale_shift="default",
    downsample_padding=0,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    dropout=0.0,
)


@dataclass
class DDPMUNetOutput(BaseOutput):
    """Output of [`DDPMUNet`].

    Args:
        sample: `[N, out_channels, H, W]`, or `[N, 2 * out_channels, H, W]` with `learned_variance` (the prediction
            first, the variance interpolation values second, as diffusers' schedulers split it).
    """

    sample: torch.Tensor


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


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
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
        h = self.conv1(_norm_silu(self.norm1, x))
        t = self.temb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            # Out of place `*` keeps norm2's memory format; `add_` is safe as mul's backward reads only its inputs.
            h = _silu((self.norm2(h) * (1 + scale)).add_(shift))
        else:
            # In place is safe: a conv's backward reads its input and weight, never its output.
            h = _norm_silu(self.norm2, h.add_(t))
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


class DDPMUNet(ModelMixin, ConfigMixin):
    r"""The DDPM U-Net (Ho et al. 2020, Appendix B): `unet(sample, timestep).sample`.

    Args:
        sample_size: training image height = width; must be divisible by `2 ** (len(channel_mult) - 1)`.
        in_channels, out_channels: image channels (3 for RGB, 1 for grayscale).
        base_channels: channels of the first level; level `i` has `base_channels * channel_mult[i]`; the time
            embedding has `4 * base_channels`.
        channel_mult: channel multiplier per resolution level; `len(channel_mult) - 1` downsamplings.
        num_res_blocks: residual blocks per level on the down path (the up path has one more).
        attention_resolutions: feature-map resolutions (e.g. `(16,)`) whose blocks are followed by self-attention;
            the middle block always has attention.
        dropout: dropout rate inside the residual blocks (0.1 for the paper's CIFAR-10 model).
        num_groups: GroupNorm groups (32); every level's channels must be divisible by it.
        norm_eps: GroupNorm epsilon (1e-6, as the paper's TensorFlow code).
        num_heads: attention heads (1, as the paper); ignored when `head_channels` is set.
        head_channels: channels per attention head, heads = channels // head_channels at each attention layer.
        resample_with_conv: stride-2 conv3x3 down / nearest + conv3x3 up (the paper); else avg-pool / nearest.
        downsample_padding: 0 pads right/bottom only before the stride-2 conv (the paper's TF "SAME"); 1 pads
            symmetrically.
        use_scale_shift_norm: FiLM the time embedding into the second GroupNorm (improved DDPM) instead of adding.
        learned_variance: output `2 * out_channels` channels (prediction, then variance values) for the
            `learned` / `learned_range` variance types.
        freq_shift, flip_sin_to_cos: sinusoidal-embedding conventions (see `timestep_embedding`); the defaults are
            the DDPM code's, which `google/ddpm-*` checkpoints use.

    `DDPMUNet()` (= `DDPMUNet.from_preset("ddpm-cifar10")`) is the paper's CIFAR-10 model with exactly 35,746,307
    parameters ("35.7M"); see `UNET_PRESETS` for the others.

    Inputs are `sample: [N, in_channels, H, W]` with H, W divisible by `2 ** (len(channel_mult) - 1)` (any such
    size works; attention sits at the same levels as for `sample_size`) and `timestep`: int, float, 0-d tensor or
    `[N]` / `[1]` tensor.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DownLevel", "MidBlock", "UpLevel", "ResBlock", "AttnBlock"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        norm_eps: float = 1e-6,
        num_heads: int = 1,
        head_channels: int | None = None,
        resample_with_conv: bool = True,
        downsample_padding: int = 0,
        use_scale_shift_norm: bool = False,
        learned_variance: bool = False,
        freq_shift: float = 1.0,
        flip_sin_to_cos: bool = False,
    ):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        _validate_config(
            sample_size, in_channels, out_channels, base_channels, channel_mult, num_res_blocks,
            attention_resolutions, dropout, num_groups, norm_eps, num_heads, head_channels, downsample_padding,
            freq_shift,
        )  # fmt: skip
        # Channels (whether the input was channels_last or not) flow channels_last on CPU, where oneDNN convs are
        # faster that way and the attention's token view is free; None = CPU only. Not config: no effect on math.
        self.channels_last: bool | None = None
        self.down_factor = 2 ** (len(channel_mult) - 1)
        chs = [base_channels * m for m in channel_mult]
        emb_ch = 4 * base_channels

        res_kw = dict(
            emb_ch=emb_ch, dropout=dropout, groups=num_groups, eps=norm_eps, scale_shift=use_scale_shift_norm
        )

        def attn_kw(ch: int):
            heads = ch // head_channels if head_channels is not None else num_heads
            return dict(num_heads=heads, groups=num_groups, eps=norm_eps)

        self.time_embed = TimestepEmbed(base_channels, freq_shift, flip_sin_to_cos)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path; `skip_chs` mirrors the stack of skip tensors the up path pops (as the paper's `hs` list).
        self.down, skip_chs, ch, res = nn.ModuleList(), [base_channels], base_channels, sample_size
        for i, out_ch in enumerate(chs):
            last = i == len(chs) - 1
            down = None if last else Downsample(out_ch, resample_with_conv, downsample_padding)
            attn = res in attention_resolutions
            self.down.append(DownLevel(ch, out_ch, num_res_blocks, attn, down, res_kw, attn_kw(out_ch)))
            skip_chs += [out_ch] * (num_res_blocks + (0 if last else 1))
            ch, res = out_ch, res if last else res // 2

        self.mid = MidBlock(ch, res_kw, attn_kw(ch))

        self.up = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(chs))):
            level_skips = [skip_chs.pop() for _ in range(num_res_blocks + 1)]
            up = Upsample(out_ch, resample_with_conv) if i > 0 else None
            attn = res in attention_resolutions
            self.up.append(UpLevel(ch, level_skips, out_ch, attn, up, res_kw, attn_kw(out_ch)))
            ch, res = out_ch, res if i == 0 else res * 2

        self.norm_out = nn.GroupNorm(num_groups, base_channels, eps=norm_eps)
        self.conv_out = nn.Conv2d(base_channels, out_channels * (2 if learned_variance else 1), 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's init: Xavier-uniform (TF `variance_scaling(1, "fan_avg", "uniform")`), zero biases, and zero
        (the paper: scale 1e-10) for the last layer of each residual branch and of the network, so every block
        starts as the identity."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            last = (m.conv2,) if isinstance(m, ResBlock) else (m.proj_out,) if isinstance(m, AttnBlock) else ()
            for layer in last:
                nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.conv_out.weight)
        self._sync_weight_format(self.conv_in.weight.device.type == "cpu")  # before any optimizer or DDP sees them

    def _sync_weight_format(self, channels_last: bool) -> None:
        """Store conv weights in the activations' memory format. Otherwise oneDNN copies every weight to
        channels_last on each call, and in training every weight gradient back (about 10% of a CPU training step).
        A no-op check per call once done; redone after loading (which brings contiguous tensors) or a device move."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if self.conv_in.weight.is_contiguous(memory_format=fmt):
            return
        with torch.inference_mode(False), torch.no_grad():  # under inference_mode, .data would become inference
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.data = m.weight.data.contiguous(memory_format=fmt)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any) -> DDPMUNet:
        """diffusers' `ModelMixin.from_pretrained`, with a clear error for a local folder missing its config."""
        check_local_component(pretrained_model_name_or_path, kwargs.get("subfolder"), cls.config_name, cls.__name__)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DDPMUNet:
        """A model from `UNET_PRESETS[name]`, with config keys overridden (e.g. `in_channels=1, out_channels=1`)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {sorted(UNET_PRESETS)}.")
        return cls(**{**UNET_PRESETS[name], **overrides})

    def _broadcast_timesteps(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        n = sample.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
        t = t.to(sample.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, n)):
            raise ValueError(
                f"timestep has shape {tuple(t.shape)}; expected a scalar, a 0-d tensor or a tensor of shape [1] "
                f"or [{n}] (the batch size)."
            )
        return t.reshape(-1).expand(n)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> DDPMUNetOutput | tuple[torch.Tensor]:
        """`sample: [N, in_channels, H, W]`, `timestep` (see the class docs) -> `[N, out_channels (x2), H, W]`."""
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}; expected [N, {self.config.in_channels}, H, W] "
                f"(in_channels={self.config.in_channels})."
            )
        if sample.shape[2] % self.down_factor or sample.shape[3] % self.down_factor:
            raise ValueError(
                f"sample spatial size {tuple(sample.shape[2:])} must be divisible by {self.down_factor} "
                f"(= 2 ** (len(channel_mult) - 1), the U-Net's total downsampling)."
            )
        emb = F.silu(self.time_embed(self._broadcast_timesteps(timestep, sample)))  # every ResBlock's SiLU(temb)

        channels_last = self.channels_last if self.channels_last is not None else sample.device.type == "cpu"
        self._sync_weight_format(channels_last)
        h = sample.contiguous(memory_format=torch.channels_last) if channels_last else sample
        h = self.conv_in(h)
        skips = [h]
        for level in self.down:
            h, level_skips = level(h, emb)
            skips += level_skips
        h = self.mid(h, emb)
        for level in self.up:
            h = level(h, skips, emb)
        out = self.conv_out(_norm_silu(self.norm_out, h)).contiguous()

        if not return_dict:
            return (out,)
        return DDPMUNetOutput(sample=out)

    # ------------------------------------------------------------------ diffusers UNet2DModel conversion

    @classmethod
    def from_diffusers_unet(cls, unet2d: UNet2DModel) -> DDPMUNet:
        """Convert a diffusers `UNet2DModel` of the DDPM family (e.g. `google/ddpm-cifar10-32`) with its weights.

        Supported: DownBlock2D / AttnDownBlock2D and UpBlock2D / AttnUpBlock2D with attention at mirrored levels,
        UNetMidBlock2D with attention, conv resampling, positional time embedding, SiLU, `block_out_channels` all
        multiples of the first. Anything else raises ValueError naming the unsupported setting.
        """
        model = cls(**_config_from_diffusers(dict(unet2d.config)))
        state = {_rename(k, _FROM_DIFFUSERS): v for k, v in unet2d.state_dict().items()}
        model.load_state_dict(state, strict=True)
        return _like(model, unet2d)

    def to_diffusers_unet(self) -> UNet2DModel:
        """The same network as a diffusers `UNet2DModel` (weights copied); ValueError where diffusers has no
        equivalent (pooling resampling, per-level head dims it cannot express)."""
        from diffusers import UNet2DModel  # not at module level: keeps diffusers' class name out of our namespace

        unet2d = UNet2DModel(**_config_to_diffusers(dict(self.config)))
        state = {_rename(k, _TO_DIFFUSERS): v for k, v in self.state_dict().items()}
        unet2d.load_state_dict(state, strict=True)
        return _like(unet2d, self)


def _like(model: ModelMixin, ref: ModelMixin) -> ModelMixin:
    """`model` on `ref`'s device, dtype and train/eval mode (`.to` only if needed: diffusers warns on dtype casts)."""
    if model.device != ref.device or model.dtype != ref.dtype:
        model = model.to(device=ref.device, dtype=ref.dtype)
    return model.train(ref.training)


def _validate_config(
    sample_size, in_channels, out_channels, base_channels, channel_mult, num_res_blocks, attention_resolutions,
    dropout, num_groups, norm_eps, num_heads, head_channels, downsample_padding, freq_shift,
) -> None:  # fmt: skip
    def positive_int(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")

    for name, value in [
        ("sample_size", sample_size),
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("base_channels", base_channels),
        ("num_res_blocks", num_res_blocks),
        ("num_groups", num_groups),
        ("num_heads", num_heads),
    ]:
        positive_int(name, value)
    if not channel_mult:
        raise ValueError("channel_mult=() must list at least one level multiplier, e.g. (1, 2, 2, 2).")
    for m in channel_mult:
        positive_int(f"channel_mult entry (in channel_mult={channel_mult})", m)
    if head_channels is not None:
        positive_int("head_channels", head_channels)
    factor = 2 ** (len(channel_mult) - 1)
    if sample_size % factor:
        raise ValueError(
            f"sample_size={sample_size} must be divisible by 2 ** (len(channel_mult) - 1) = {factor} for "
            f"channel_mult={channel_mult}; allowed: multiples of {factor}."
        )
    reached = [sample_size // 2**i for i in range(len(channel_mult))]
    missing = [r for r in attention_resolutions if r not in reached]
    if missing:
        raise ValueError(
            f"attention_resolutions={attention_resolutions}: {missing} not reached; with sample_size={sample_size} "
            f"and {len(channel_mult)} levels the feature maps have resolutions {reached}."
        )
    for ch in sorted({base_channels * m for m in channel_mult} | {base_channels}):
        if ch % num_groups:
            raise ValueError(
                f"channels {ch} (base_channels * channel_mult) are not divisible by num_groups={num_groups}."
            )
    attn_chs = {base_channels * channel_mult[reached.index(r)] for r in attention_resolutions}
    attn_chs.add(base_channels * channel_mult[-1])  # the middle block's attention
    for ch in sorted(attn_chs):
        div, what = (head_channels, "head_channels") if head_channels is not None else (num_heads, "num_heads")
        if ch % div:
            raise ValueError(f"attention channels {ch} are not divisible by {what}={div}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1).")
    if not norm_eps > 0:
        raise ValueError(f"norm_eps={norm_eps} must be positive.")
    if downsample_padding not in (0, 1):
        raise ValueError(f"downsample_padding={downsample_padding!r} must be 0 (right/bottom, the paper) or 1.")
    if base_channels // 2 - freq_shift <= 0:
        raise ValueError(
            f"freq_shift={freq_shift} must be smaller than base_channels // 2 = {base_channels // 2} (the number "
            f"of sinusoid frequencies)."
        )


# State-dict key renames between diffusers' UNet2DModel and DDPMUNet (prefix patterns, applied in order).
_FROM_DIFFUSERS = [
    (r"^time_embedding\.", "time_embed."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),
    (r"^(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.upsample."),
    (r"^mid_block\.resnets\.", "mid.res."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"\.time_emb_proj\.", ".temb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
]
_TO_DIFFUSERS = [
    (r"^time_embed\.", "time_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^(down|up)\.(\d+)\.res\.", r"\1_blocks.\2.resnets."),
    (r"^(down|up)\.(\d+)\.attn\.", r"\1_blocks.\2.attentions."),
    (r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid\.res\.", "mid_block.resnets."),
    (r"^mid\.attn\.", "mid_block.attentions.0."),
    (r"\.temb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.([qkv])\.", r"\1.to_\2."),
    (r"\.proj_out\.", ".to_out.0."),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def _strip_prefix(block_type: str) -> str:
    return block_type[len("UNetRes") :] if block_type.startswith("UNetRes") else block_type


def _config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our config for a diffusers `UNet2DModel` config; ValueError naming the first unsupported setting."""
    required = {
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "mid_block_type": "UNetMidBlock2D",
        "mid_block_scale_factor": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
    }
    for key, allowed in required.items():
        if key in cfg and cfg[key] != allowed:
            raise ValueError(f"Unsupported UNet2DModel config: {key}={cfg[key]!r} (DDPMUNet supports {allowed!r}).")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"Unsupported UNet2DModel config: act_fn={cfg['act_fn']!r} (DDPMUNet supports 'silu').")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(
            f"Unsupported UNet2DModel config: resnet_time_scale_shift={shift!r} (supported: 'default', 'scale_shift')."
        )
    groups, attn_groups = cfg["norm_num_groups"], cfg.get("attn_norm_num_groups")
    if attn_groups is not None and attn_groups != groups:
        raise ValueError(
            f"Unsupported UNet2DModel config: attn_norm_num_groups={attn_groups} != norm_num_groups={groups}."
        )
    if shift == "scale_shift" and attn_groups is None:
        # diffusers' mid block drops its attention GroupNorm in this case; ours always has it.
        raise ValueError(
            "Unsupported UNet2DModel config: resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None "
            "(the mid-block attention has no GroupNorm); set attn_norm_num_groups=norm_num_groups."
        )

    down = [_strip_prefix(t) for t in cfg["down_block_types"]]
    up = [_strip_prefix(t) for t in cfg["up_block_types"]]
    for t in down:
        if t not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ValueError(
                f"Unsupported UNet2DModel down block type {t!r} (supported: DownBlock2D, AttnDownBlock2D)."
            )
    for t in up:
        if t not in ("UpBlock2D", "AttnUpBlock2D"):
            raise ValueError(f"Unsupported UNet2DModel up block type {t!r} (supported: UpBlock2D, AttnUpBlock2D).")
    down_attn = [t == "AttnDownBlock2D" for t in down]
    up_attn = [t == "AttnUpBlock2D" for t in reversed(up)]
    if len(down) != len(up) or down_attn != up_attn:
        raise ValueError(
            f"Unsupported UNet2DModel config: down_block_types={tuple(cfg['down_block_types'])} and "
            f"up_block_types={tuple(cfg['up_block_types'])} must have attention at mirrored levels."
        )

    chs = list(cfg["block_out_channels"])
    base = chs[0]
    if any(c % base for c in chs):
        raise ValueError(
            f"Unsupported UNet2DModel config: block_out_channels={tuple(chs)} are not multiples of {base}."
        )
    if cfg.get("time_embedding_dim") not in (None, 4 * base):
        raise ValueError(
            f"Unsupported UNet2DModel config: time_embedding_dim={cfg['time_embedding_dim']} (DDPMUNet uses "
            f"4 * block_out_channels[0] = {4 * base})."
        )
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"Unsupported UNet2DModel config: sample_size={size} (DDPMUNet needs a square size).")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(
            f"Unsupported UNet2DModel config: sample_size={size!r} (an int is needed to place attention)."
        )
    head_dim = cfg.get("attention_head_dim")
    return dict(
        sample_size=size,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        base_channels=base,
        channel_mult=tuple(c // base for c in chs),
        num_res_blocks=cfg["layers_per_block"],
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(down_attn) if a),
        dropout=cfg.get("dropout", 0.0),
        num_groups=groups,
        norm_eps=cfg["norm_eps"],
        num_heads=1,
        head_channels=head_dim,
        resample_with_conv=True,
        downsample_padding=cfg.get("downsample_padding", 1),
        use_scale_shift_norm=shift == "scale_shift",
        learned_variance=False,
        freq_shift=cfg["freq_shift"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
    )


def _config_to_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """A diffusers `UNet2DModel` config for our config; ValueError where diffusers cannot express it."""
    if not cfg["resample_with_conv"]:
        raise ValueError(
            "resample_with_conv=False has no UNet2DModel equivalent (its DDPM blocks resample with convs)."
        )
    base, mult, size = cfg["base_channels"], tuple(cfg["channel_mult"]), cfg["sample_size"]
    chs = [base * m for m in mult]
    attn = [size // 2**i in tuple(cfg["attention_resolutions"]) for i in range(len(mult))]
    head_dim = cfg["head_channels"]
    if head_dim is None and cfg["num_heads"] != 1:
        attn_chs = {c for c, a in zip(chs, attn) if a} | {chs[-1]}
        if len(attn_chs) != 1:
            raise ValueError(
                f"num_heads={cfg['num_heads']} with attention at channel counts {sorted(attn_chs)} has no UNet2DModel "
                "equivalent (it has one attention_head_dim); use head_channels."
            )
        head_dim = attn_chs.pop() // cfg["num_heads"]
    scale_shift = cfg["use_scale_shift_norm"]
    return dict(
        sample_size=size,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"] * (2 if cfg["learned_variance"] else 1),
        time_embedding_type="positional",
        freq_shift=cfg["freq_shift"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(chs),
        layers_per_block=cfg["num_res_blocks"],
        downsample_padding=cfg["downsample_padding"],
        dropout=cfg["dropout"],
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=cfg["num_groups"],
        attn_norm_num_groups=cfg["num_groups"] if scale_shift else None,
        norm_eps=cfg["norm_eps"],
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=True,
    )
