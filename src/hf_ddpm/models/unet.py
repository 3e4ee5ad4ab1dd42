"""The U-Net of DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239, Appendix B) as a diffusers model.

A PixelCNN++-style U-Net: `num_res_blocks` residual blocks per resolution level, GroupNorm, SiLU, a sinusoidal
timestep embedding added inside every residual block, single-head self-attention at chosen resolutions (16x16 in
the paper) and in the middle, skip connections from every down-path block to the up path.

The module tree is laid out so that diffusers' `UNet2DModel` (DownBlock2D / AttnDownBlock2D / UpBlock2D /
AttnUpBlock2D, the `google/ddpm-*` checkpoints) converts by renaming state-dict keys only: same tensors, same shapes
(`diffusers_conversion.py`). The blocks live in `unet_blocks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..loading import check_local_component
from .unet_blocks import (
    AttnBlock,
    DownLevel,
    Downsample,
    MidBlock,
    ResBlock,
    TimestepEmbed,
    UpLevel,
    Upsample,
    norm_silu,
    timestep_embedding,
)

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["DDPMUNet", "DDPMUNetOutput", "UNET_PRESETS", "timestep_embedding"]


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


@dataclass
class DDPMUNetOutput(BaseOutput):
    """Output of [`DDPMUNet`].

    Args:
        sample: `[N, out_channels, H, W]`, or `[N, 2 * out_channels, H, W]` with `learned_variance` (the prediction
            first, the variance interpolation values second, as diffusers' schedulers split it).
    """

    sample: torch.Tensor


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
        out = self.conv_out(norm_silu(self.norm_out, h)).contiguous()

        if not return_dict:
            return (out,)
        return DDPMUNetOutput(sample=out)

    # ------------------------------------------------------------------ diffusers UNet2DModel conversion

    @classmethod
    def from_diffusers_unet(cls, unet2d: UNet2DModel) -> DDPMUNet:
        """Convert a diffusers `UNet2DModel` of the DDPM family (e.g. `google/ddpm-cifar10-32`) with its weights;
        ValueError naming the first setting `DDPMUNet` cannot express (see `diffusers_conversion.unet_from_diffusers`).
        """
        from .diffusers_conversion import unet_from_diffusers  # it imports this module

        return unet_from_diffusers(unet2d)

    def to_diffusers_unet(self) -> UNet2DModel:
        """The same network as a diffusers `UNet2DModel` (weights copied); ValueError where diffusers has no
        equivalent (pooling resampling, per-level head dims it cannot express)."""
        from .diffusers_conversion import unet_to_diffusers  # it imports this module

        return unet_to_diffusers(self)


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
