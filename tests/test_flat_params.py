"""Tests for hf_ddpm.training.flat_params: the module's parameters, gradients and EMA as views into flat buffers give
the same forward, gradients, AdamW update, clipping and EMA as the per-tensor versions, survive save/load, and a
gradient taken out of its buffer is caught instead of silently dropped."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from hf_ddpm import DDPMUNet
from hf_ddpm.training.flat_params import FlatEMA, FlatParameters, register_flat_checkpointing


def small_unet() -> DDPMUNet:
    torch.manual_seed(0)
    unet = DDPMUNet(
        sample_size=8, in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2),
        attention_resolutions=(4,), num_groups=4, dropout=0.0,
    )  # fmt: skip
    unet.channels_last = True
    unet.to(memory_format=torch.channels_last)
    with torch.no_grad():  # the paper's init zeroes the last layers, which would hide a wrong mapping
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return unet


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen)


def loss_of(unet: DDPMUNet) -> torch.Tensor:
    x, t = batch()
    return (unet(x, t).sample ** 2).mean()


def test_views_keep_values_layout_and_gradients():
    reference, unet = small_unet(), small_unet()
    flat = FlatParameters(unet.parameters())
    params = list(unet.parameters())
    assert flat.data.numel() == sum(p.numel() for p in params)
    storage = flat.data.untyped_storage().data_ptr()
    for p, q in zip(params, reference.parameters()):
        assert p.untyped_storage().data_ptr() == storage  # a view of the buffer, not a copy
        assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
        assert p.stride() == q.stride()  # channels_last conv weights stay channels_last
        assert torch.equal(p, q)
    loss_of(reference).backward()
    loss_of(unet).backward()
    for p, q in zip(params, reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    as_stored = [q.grad.permute(*_memory_order(q)).reshape(-1) for q in reference.parameters()]
    assert torch.equal(flat.grad, torch.cat(as_stored))  # each gradient in its parameter's place, as laid out
    flat.zero_grad()
    assert not flat.grad.any() and all(p.grad is not None and not p.grad.any() for p in params)


def _memory_order(t: torch.Tensor) -> list[int]:
    """The dimension order in which `t` is laid out in memory (for flattening it as stored)."""
    return sorted(range(t.ndim), key=lambda d: -t.stride(d))


def test_adamw_steps_and_clipping_match_per_tensor_ones():
    reference, unet = small_unet(), small_unet()
    flat = FlatParameters(unet.parameters())
    settings = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8, fused=True)
    opt_ref = torch.optim.AdamW(reference.parameters(), **settings)
    opt = torch.optim.AdamW([flat.param], **settings)
    for _ in range(3):
        loss_of(reference).backward()
        loss_of(unet).backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
        norm = torch.nn.utils.clip_grad_norm_([flat.param], 0.01)
        torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=0)  # one norm over the buffer = norm of norms
        for p, q in zip(unet.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
            p.grad.copy_(q.grad)  # the same gradients into both optimizers: their updates must then agree exactly
        opt_ref.step()
        opt.step()
        for p, q in zip(unet.parameters(), reference.parameters()):
            assert torch.equal(p, q)
        opt_ref.zero_grad(set_to_none=True)
        flat.zero_grad()
    assert not torch.equal(flat.data, FlatParameters(small_unet().parameters()).data)  # the steps moved the weights


def test_flat_ema_matches_diffusers_ema_step():
    reference, unet = small_unet(), small_unet()
    flat = FlatParameters(unet.parameters())
    settings = dict(decay=0.999, use_ema_warmup=True, inv_gamma=2.0, power=1.0)
    ema_ref = EMAModel(reference.parameters(), **settings)
    ema = FlatEMA(EMAModel(flat.params, **settings), flat)
    for step in range(4):
        with torch.no_grad():
            for p, q in zip(unet.parameters(), reference.parameters()):
                delta = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                p.add_(delta)
                q.add_(delta)
        ema_ref.step(reference.parameters())
        ema.step()
    assert ema.ema.optimization_step == ema_ref.optimization_step == 4
    assert ema.ema.cur_decay_value == ema_ref.cur_decay_value
    for s, r in zip(ema.ema.shadow_params, ema_ref.shadow_params):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)  # lerp_ rounds unlike sub_


def test_flat_ema_rebinds_after_load_state_dict():
    unet = small_unet()
    flat = FlatParameters(unet.parameters())
    ema = FlatEMA(EMAModel(flat.params, decay=0.9), flat)
    state = copy.deepcopy(ema.ema.state_dict())
    state["shadow_params"] = [torch.full_like(s, 0.5) for s in state["shadow_params"]]
    ema.ema.load_state_dict(state)  # replaces the shadow list, as a resumed checkpoint does
    ema.rebind()
    assert all(
        s.untyped_storage().data_ptr() == ema.shadow.untyped_storage().data_ptr() for s in ema.ema.shadow_params
    )
    assert torch.equal(ema.shadow, torch.full_like(ema.shadow, 0.5))
    ema.step()  # decay 0 at step 1 with warmup: the shadow takes the weights
    assert torch.equal(ema.shadow, flat.data)


def test_a_gradient_taken_out_of_the_buffer_is_an_error():
    unet = small_unet()
    flat = FlatParameters(unet.parameters())
    unet.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"set to None.*FlatParameters.zero_grad"):
        flat.zero_grad()
    flat = FlatParameters(unet.parameters())
    torch.optim.AdamW([flat.param]).zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"flat parameter's gradient was replaced or set to None"):
        flat.zero_grad()


def test_a_parameter_moved_out_of_the_buffer_is_an_error():
    unet = small_unet()
    flat = FlatParameters(unet.parameters())
    unet.conv_in.weight.data = unet.conv_in.weight.data.clone()
    with pytest.raises(RuntimeError, match=r"shape \(8, 1, 3, 3\) no longer lies in the flat buffer"):
        flat.zero_grad()


def test_per_tensor_state_with_unequal_steps_is_an_error():
    unet = small_unet()
    params = list(unet.parameters())
    per_tensor = torch.optim.AdamW(params)
    params[0].grad = torch.ones_like(params[0])  # only one parameter has a gradient: only its step advances
    per_tensor.step()
    for p in params:
        p.grad = torch.ones_like(p)
    per_tensor.step()
    flat = FlatParameters(params)
    opt = torch.optim.AdamW([flat.param])
    flat.attach_optimizer(opt)
    with pytest.raises(ValueError, match="'step' differs between parameters"):
        opt.load_state_dict(per_tensor.state_dict())


def test_bad_parameters_are_errors_naming_them():
    with pytest.raises(ValueError, match="at least one"):
        FlatParameters([])
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    with pytest.raises(ValueError, match=r"torch\.float64.*next to torch\.float32"):
        FlatParameters(mixed)
    frozen = [torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    with pytest.raises(ValueError, match="requires_grad=False"):
        FlatParameters(frozen)
    flat = FlatParameters([torch.nn.Parameter(torch.zeros(2, 3))])
    with pytest.raises(ValueError, match=r"flat buffer of 6 elements, got shape \(5,\)"):
        flat.views(torch.zeros(5))


def test_accelerate_checkpoint_keeps_every_weight(tmp_path):
    """accelerate's safetensors writer keeps one tensor per storage and safetensors' loader cannot walk shared
    channels_last views: through `register_flat_checkpointing` every weight is written and read back into the
    buffer."""
    unet = small_unet()
    flat = FlatParameters(unet.parameters())
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(unet)
    register_flat_checkpointing(accelerator)
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    expected = {k: v.clone() for k, v in unet.state_dict().items()}
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    with torch.no_grad():
        flat.data.zero_()
    accelerator.load_state(str(tmp_path / "ckpt"))
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert all(p.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr() for p in unet.parameters())
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        accelerator.load_state(str(tmp_path / "ckpt"))


def test_optimizer_state_is_saved_per_parameter_whatever_the_layout():
    """Saved, the flat optimizer's state is a per-tensor optimizer's: it loads under the other memory layout (a CPU
    run resumed on a GPU) and from a per-tensor optimizer's state (checkpoints from before the flat buffers), and the
    next update is the one the per-tensor optimizer makes."""
    settings = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8, fused=True)
    reference = small_unet()
    opt_ref = torch.optim.AdamW(reference.parameters(), **settings)
    channels_last = small_unet()
    flat = FlatParameters(channels_last.parameters())
    opt = torch.optim.AdamW([flat.param], **settings)
    flat.attach_optimizer(opt)
    for _ in range(2):
        loss_of(reference).backward()
        for p, q in zip(channels_last.parameters(), reference.parameters()):
            p.grad.copy_(q.grad)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad(set_to_none=True)
        flat.zero_grad()
    saved, saved_ref = opt.state_dict(), opt_ref.state_dict()
    assert saved["param_groups"] == saved_ref["param_groups"]
    for i, state in saved_ref["state"].items():
        assert saved["state"][i].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(saved["state"][i][key], value), (i, key)

    nchw = small_unet().to(memory_format=torch.contiguous_format)
    nchw.channels_last = False
    for source in (saved, saved_ref):  # the flat optimizer's own state, and a per-tensor optimizer's
        model = copy.deepcopy(nchw)
        model.load_state_dict(reference.state_dict())
        other = FlatParameters(model.parameters())
        conv = 8  # down.0.res.0.conv1.weight, [8, 8, 3, 3]: its elements lie in another order in each layout
        assert other.params[conv].is_contiguous() and not flat.params[conv].is_contiguous()
        opt_other = torch.optim.AdamW([other.param], **settings)
        other.attach_optimizer(opt_other)
        opt_other.load_state_dict(copy.deepcopy(source))
        ref = copy.deepcopy(reference)
        opt_next = torch.optim.AdamW(ref.parameters(), **settings)
        opt_next.load_state_dict(saved_ref)
        loss_of(ref).backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad.copy_(q.grad)
        opt_next.step()
        opt_other.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)


def test_optimizer_state_of_another_model_is_an_error():
    flat = FlatParameters(small_unet().parameters())
    opt = torch.optim.AdamW([flat.param])
    flat.attach_optimizer(opt)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[1\]; this model trains \d+ parameters"):
        opt.load_state_dict(other.state_dict())
