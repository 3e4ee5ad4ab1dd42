"""DDPMUNet: config contract, shapes, numerics against diffusers' UNet2DModel, saving, checkpointing, pipelines."""

import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from hf_ddpm.models.diffusers_conversion import _FROM_DIFFUSERS, GOOGLE_DDPM_CIFAR10_UNET2D, _rename
from hf_ddpm.models.unet import DDPMUNet, DDPMUNetOutput

# A small model with every feature (attention at 8x8, downsampling, skip convs) that runs in milliseconds.
TINY = dict(sample_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            num_groups=4, dropout=0.0)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine OpenMP barriers
    make 2-thread runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: our init zeroes the last layer of each residual branch, which would make many
    comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def tiny(**overrides) -> DDPMUNet:
    return randomize(DDPMUNet(**{**TINY, **overrides}).eval())


def inputs(n=2, c=3, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=gen), torch.tensor([3, 700][:n] + [10] * max(0, n - 2))


# ---------------------------------------------------------------------------------------------------- presets


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar10_preset_has_the_papers_parameter_count():
    model = DDPMUNet.from_preset("ddpm-cifar10")
    assert num_params(model) == 35_746_307  # the paper's "35.7M"
    assert model.config.sample_size == 32 and model.config.dropout == 0.1
    assert model.config.attention_resolutions == (16,)


@pytest.mark.parametrize(
    "name, count",
    [("ddpm-celebahq-256", 113_673_219), ("tiny-16", 1_113_955), ("small-32", 6_472_195)],
)
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):  # no memory, no init time: counting only
        model = DDPMUNet.from_preset(name)
    assert num_params(model) == count


def test_preset_overrides_and_unknown_name():
    model = DDPMUNet.from_preset("tiny-16", in_channels=1, out_channels=1)
    assert (model.config.in_channels, model.config.out_channels, model.config.sample_size) == (1, 1, 16)
    with pytest.raises(ValueError, match=r"Unknown preset 'nope'.*tiny-16"):
        DDPMUNet.from_preset("nope")


def test_cifar10_config_matches_diffusers_parameter_count():
    with torch.device("meta"):
        theirs = UNet2DModel(**GOOGLE_DDPM_CIFAR10_UNET2D)
    assert num_params(theirs) == 35_746_307


# ---------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_output_shape(channels, size):
    model = tiny(sample_size=size, in_channels=channels, out_channels=channels, attention_resolutions=(size // 2,))
    x, t = inputs(2, channels, size)
    with torch.no_grad():
        out = model(x, t)
    assert isinstance(out, DDPMUNetOutput)
    assert out.sample.shape == (2, channels, size, size) and out.sample.is_contiguous()
    assert torch.isfinite(out.sample).all()


def test_other_input_sizes_and_return_tuple():
    model = tiny()
    x = torch.randn(1, 3, 8, 24)  # any size divisible by the total downsampling works
    with torch.no_grad():
        (out,) = model(x, 5, return_dict=False)
    assert out.shape == (1, 3, 8, 24)


def test_learned_variance_doubles_output_channels():
    model = tiny(learned_variance=True, in_channels=1, out_channels=1)
    x, t = inputs(2, 1)
    with torch.no_grad():
        assert model(x, t).sample.shape == (2, 2, 16, 16)


@pytest.mark.parametrize("overrides", [{}, {"use_scale_shift_norm": True, "head_channels": 8}])
def test_int_0d_and_batch_timesteps_agree(overrides):
    model = tiny(**overrides)
    x, _ = inputs(3)
    with torch.no_grad():
        ref = model(x, torch.tensor([42, 42, 42])).sample
        for t in (42, torch.tensor(42), torch.tensor([42]), torch.tensor(42.0)):
            torch.testing.assert_close(model(x, t).sample, ref, rtol=0, atol=0)
        # and the timestep matters, per sample
        mixed = model(x, torch.tensor([42, 900, 42])).sample
    assert torch.equal(mixed[0], ref[0]) and not torch.allclose(mixed[1], ref[1])


def test_channels_last_and_contiguous_paths_agree():
    model = tiny()
    x, t = inputs()
    with torch.no_grad():
        a = model(x, t).sample
        model.channels_last = False
        b = model(x, t).sample
        c = model(x.contiguous(memory_format=torch.channels_last), t).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- diffusers


def converted_pair(seed=0, **config):
    torch.manual_seed(seed)
    theirs = UNet2DModel(**{**GOOGLE_DDPM_CIFAR10_UNET2D, **config}).eval()
    return theirs, DDPMUNet.from_diffusers_unet(theirs)


def max_diff(theirs, ours, x, t) -> float:
    with torch.no_grad():
        return (theirs(x, t).sample - ours(x, t).sample).abs().max().item()


def test_conversion_of_the_full_cifar10_config():
    theirs, ours = converted_pair()
    assert num_params(ours) == 35_746_307 and not ours.training
    cfg = ours.config
    assert (cfg.base_channels, cfg.channel_mult, cfg.attention_resolutions) == (128, (1, 2, 2, 2), (16,))
    assert (cfg.num_res_blocks, cfg.downsample_padding, cfg.freq_shift, cfg.flip_sin_to_cos) == (2, 0, 1, False)
    x, _ = inputs(1, 3, 32)
    assert max_diff(theirs, ours, x, torch.tensor([617])) <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8),
        # the other conventions: symmetric padding, cos-first sinusoids, FiLM, multi-head attention, 2 levels
        dict(
            block_out_channels=(32, 64),
            down_block_types=("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D"),
            norm_num_groups=8,
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            resnet_time_scale_shift="scale_shift",
            attn_norm_num_groups=8,
            attention_head_dim=8,
            layers_per_block=1,
        ),
    ],
)
def test_conversion_matches_diffusers(config):
    theirs, ours = converted_pair(**config)
    x, t = inputs(2, 3, 32)
    assert max_diff(theirs, ours, x, t) <= 1e-5
    assert max_diff(theirs, ours, x, 123) <= 1e-5
    back = ours.to_diffusers_unet()
    assert max_diff(back, ours, x, t) <= 1e-5
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_conversion_to_diffusers_from_ours():
    ours = tiny(learned_variance=True, use_scale_shift_norm=True)
    theirs = ours.to_diffusers_unet()
    assert theirs.config.out_channels == 6
    x, t = inputs()
    assert max_diff(theirs, ours, x, t) <= 1e-5
    with pytest.raises(ValueError, match="resample_with_conv=False"):
        tiny(resample_with_conv=False).to_diffusers_unet()


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(down_block_types=("DownBlock2D", "ResnetDownsampleBlock2D", "DownBlock2D", "DownBlock2D")),
         "down block type 'ResnetDownsampleBlock2D'"),
        (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")), "mirrored levels"),
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
        (dict(center_input_sample=True), "center_input_sample=True"),
        (dict(act_fn="mish"), "act_fn='mish'"),
        (dict(block_out_channels=(128, 192, 256, 256)), r"block_out_channels=\(128, 192, 256, 256\)"),
        (dict(resnet_time_scale_shift="scale_shift"), "attn_norm_num_groups=None"),
        (dict(num_class_embeds=10), "num_class_embeds=10"),
    ],
)  # fmt: skip
def test_unsupported_diffusers_configs(config, message):
    with torch.device("meta"):
        theirs = UNet2DModel(**{**GOOGLE_DDPM_CIFAR10_UNET2D, **config})
    with pytest.raises(ValueError, match=message):
        DDPMUNet.from_diffusers_unet(theirs)


def test_works_inside_diffusers_ddpm_pipeline():
    model = tiny(in_channels=1, out_channels=1)
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 16, 16, 1)


# ---------------------------------------------------------------------------------------------------- saving


def test_save_and_load_round_trip(tmp_path):
    model = tiny(use_scale_shift_norm=True, learned_variance=True)
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = DDPMUNet.from_pretrained(tmp_path).eval()
    public = lambda m: {k: list(v) if isinstance(v, tuple) else v for k, v in m.config.items() if k[0] != "_"}  # noqa: E731
    assert public(loaded) == public(model)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)


def test_no_split_modules_allow_device_map(tmp_path):
    tiny().save_pretrained(tmp_path)
    model = DDPMUNet.from_pretrained(tmp_path, device_map="auto")
    assert model.device.type == "cpu"
    classes = {type(m).__name__ for m in model.modules()}
    assert set(DDPMUNet._no_split_modules) <= classes


# ---------------------------------------------------------------------------------------------------- training


def grads(model, x, t):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same dropout masks
    model(x, t).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(dropout=0.2).train()
    x, t = inputs()
    x.requires_grad_(True)
    ref = grads(model, x, t)
    model.enable_gradient_checkpointing()
    assert all(level.gradient_checkpointing for level in [*model.down, model.mid, *model.up])
    ckpt = grads(model, x, t)
    assert ref.keys() == ckpt.keys()
    for name in ref:
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in ref.values())


def test_backward_gradients_match_diffusers():
    theirs, ours = converted_pair(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)  # fmt: skip
    x, t = inputs(2, 3, 32)
    g_theirs = {_rename(k, _FROM_DIFFUSERS): g for k, g in grads(theirs.train(), x, t).items()}
    g_ours = grads(ours.train(), x, t)
    assert g_theirs.keys() == g_ours.keys()
    for name, g in g_ours.items():
        torch.testing.assert_close(g, g_theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_forward_and_backward():
    model = tiny().train()
    x, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t).sample
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        ref = model.eval()(x, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t).sample
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
    with torch.no_grad():  # and a model cast to bfloat16 throughout
        out = model.to(torch.bfloat16)(x.bfloat16(), t).sample
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sample_size=20), r"sample_size=20 must be divisible by 2 \*\* \(len\(channel_mult\) - 1\) = 8"),
        (dict(sample_size=32, attention_resolutions=(12,)), r"attention_resolutions=\(12,\): \[12\] not reached.*\[32, 16, 8, 4\]"),
        (dict(base_channels=100), "channels 100 .* not divisible by num_groups=32"),
        (dict(num_groups=0), "num_groups=0 must be a positive integer"),
        (dict(channel_mult=()), r"channel_mult=\(\) must list at least one"),
        (dict(channel_mult=(1, 0)), "channel_mult entry"),
        (dict(num_res_blocks=0), "num_res_blocks=0 must be a positive integer"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(num_heads=3), "attention channels 256 are not divisible by num_heads=3"),
        (dict(head_channels=48), "attention channels 256 are not divisible by head_channels=48"),
        (dict(downsample_padding=2), "downsample_padding=2 must be 0"),
        (dict(norm_eps=0.0), "norm_eps=0.0 must be positive"),
        (dict(in_channels=0), "in_channels=0 must be a positive integer"),
        (dict(sample_size=32.0), "sample_size=32.0 must be a positive integer"),
    ],
)  # fmt: skip
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        DDPMUNet(**overrides)


def test_bad_inputs_raise():
    model = tiny()  # 2 levels: total downsampling 2
    with pytest.raises(ValueError, match=r"spatial size \(15, 16\) must be divisible by 2"):
        model(torch.randn(1, 3, 15, 16), 1)
    with pytest.raises(ValueError, match=r"sample has shape \(1, 1, 16, 16\); expected \[N, 3, H, W\]"):
        model(torch.randn(1, 1, 16, 16), 1)
    with pytest.raises(ValueError, match=r"sample has shape \(3, 16, 16\)"):
        model(torch.randn(3, 16, 16), 1)
    with pytest.raises(ValueError, match=r"timestep has shape \(3,\); expected .* \[2\]"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
