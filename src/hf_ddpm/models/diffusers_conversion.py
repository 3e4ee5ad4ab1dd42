"""Conversion between diffusers' `UNet2DModel` (the DDPM family: `google/ddpm-*`) and `DDPMUNet`.

The two networks hold the same tensors with the same shapes; converting renames state-dict keys (`_FROM_DIFFUSERS`,
`_TO_DIFFUSERS`) and maps the configs (`_config_from_diffusers`, `_config_to_diffusers`). A `UNet2DModel` setting that
`DDPMUNet` cannot express (cross-attention or ResNet up/down blocks, class embeddings, Fourier time embedding, ...)
raises a one-line ValueError naming it.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any

from diffusers.models.modeling_utils import ModelMixin

from .unet import DDPMUNet

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["GOOGLE_DDPM_CIFAR10_UNET2D", "ddpm_unet_config_from_diffusers", "unet_from_diffusers", "unet_to_diffusers"]


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


def unet_from_diffusers(unet2d: UNet2DModel) -> DDPMUNet:
    """Convert a diffusers `UNet2DModel` of the DDPM family (e.g. `google/ddpm-cifar10-32`) with its weights.

    Supported: DownBlock2D / AttnDownBlock2D and UpBlock2D / AttnUpBlock2D with attention at mirrored levels,
    UNetMidBlock2D with attention, conv resampling, positional time embedding, SiLU, `block_out_channels` all
    multiples of the first. Anything else raises ValueError naming the unsupported setting.
    """
    model = DDPMUNet(**_config_from_diffusers(dict(unet2d.config)))
    state = {_rename(k, _FROM_DIFFUSERS): v for k, v in unet2d.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return _like(model, unet2d)


def unet_to_diffusers(unet: DDPMUNet) -> UNet2DModel:
    """The same network as a diffusers `UNet2DModel` (weights copied); ValueError where diffusers has no
    equivalent (pooling resampling, per-level head dims it cannot express)."""
    from diffusers import UNet2DModel  # not at module level: keeps diffusers' class name out of our namespace

    unet2d = UNet2DModel(**_config_to_diffusers(dict(unet.config)))
    state = {_rename(k, _TO_DIFFUSERS): v for k, v in unet.state_dict().items()}
    unet2d.load_state_dict(state, strict=True)
    return _like(unet2d, unet)


def ddpm_unet_config_from_diffusers(unet2d_config: dict[str, Any]) -> dict[str, Any]:
    """The `DDPMUNet` config for a `UNet2DModel` config as saved in a `config.json` (keys it omits take
    `UNet2DModel`'s defaults, as diffusers does when loading it); ValueError naming the first unsupported setting.

    Checks a repository's U-Net before its weights are downloaded or a model is built.
    """
    from diffusers import UNet2DModel

    defaults = {
        name: p.default
        for name, p in inspect.signature(UNet2DModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return _config_from_diffusers({**defaults, **{k: v for k, v in unet2d_config.items() if not k.startswith("_")}})


def _like(model: ModelMixin, ref: ModelMixin) -> ModelMixin:
    """`model` on `ref`'s device, dtype and train/eval mode (`.to` only if needed: diffusers warns on dtype casts)."""
    if model.device != ref.device or model.dtype != ref.dtype:
        model = model.to(device=ref.device, dtype=ref.dtype)
    return model.train(ref.training)


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
