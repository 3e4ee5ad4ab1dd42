"""Every diffusers scheduler swapped into HFDDPMPipeline the user's way, `XScheduler.from_config(pipe.scheduler.config)`:

* on the Gaussian oracle's exact ε-model (data N(m, s²)) each reproduces N(m, s²) at 50 steps — which needs the
  pipeline's `init_noise_sigma` / `scale_model_input` / multi-order handling, and the test fails without it;
* configs our schedulers save, for schedules diffusers has no name for, load into each of them with the same ᾱ;
* on the bundled digits model each gives all ten digits (the σ-space ones at leading spacing, see DIGITS_RUNS).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from helpers import MEAN, SPACE_DIR, STD, GaussianOracle, exact_sampler_moments

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, HFDDPMPipeline
from hf_ddpm.diffusion import GaussianDiffusion
from hf_ddpm.schedules import make_betas

SOLVERS = {
    "dpmsolver++": DPMSolverMultistepScheduler,  # 2M: solver_order=2, algorithm_type="dpmsolver++" by default
    "unipc": UniPCMultistepScheduler,
    "deis": DEISMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
}
REFERENCES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
STOCHASTIC = {"euler_ancestral", "ddpm"}
# 64 images of 1x16x16: 16,384 independent scalars (the oracle is elementwise).
SHAPE = (64, 1, 16, 16)
N = math.prod(SHAPE)
# Sampling error: 4 standard errors of the sample mean (s/√n) and variance (s²√(2/n)) at N scalars, ~0.016 and ~0.011.
MEAN_SAMPLING_TOL, VAR_SAMPLING_TOL = 4 * STD / math.sqrt(N), 4 * STD**2 * math.sqrt(2 / N)
# Discretisation at 50 steps. Euler is DDIM (η = 0) and Euler ancestral DDIM with η = 1 in σ-space (Karras et al.
# 2022, section 4), so they must hit DDIM's exact 50-step law (test_oracle.py), whose variance is 6-21% low; the
# higher-order solvers must hit N(m, s²) itself, up to this allowance (measured: at most 3.2%, DEIS on linear).
# Heun must hit its own exact law: its first step on the cosine schedule (σ 2·10⁴ -> 32) is +7.6% in std.
VAR_HIGHER_ORDER_TOL = 0.04 * STD**2
EULER_ETA = {"euler": 0.0, "euler_ancestral": 1.0}


class OracleUNet(ModelMixin, ConfigMixin):
    """The exact ε-model of data N(MEAN, STD²) as a pipeline U-Net: `unet(x_t, t).sample` = E[ε | x_t]."""

    @register_to_config
    def __init__(self, alphas_cumprod: list[float], sample_size: int = 16, in_channels: int = 1):
        super().__init__()
        self.oracle = GaussianOracle(torch.tensor(alphas_cumprod, dtype=torch.float64))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the pipeline a device and dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> BaseOutput:
        t = float(timestep)
        # trailing spacing puts every scheduler on integer timesteps, where the oracle is exact
        assert t == round(t), f"fractional timestep {t}"
        eps = self.oracle(sample.double(), round(t)).to(sample.dtype)
        return BaseOutput(sample=eps)


def oracle_pipeline(beta_schedule: str = "cosine") -> HFDDPMPipeline:
    scheduler = DDPMPosteriorScheduler(beta_schedule=beta_schedule, clip_sample=False, timestep_spacing="trailing")
    unet = OracleUNet(scheduler.diffusion.alphas_cumprod.tolist(), SHAPE[-1], SHAPE[1])
    pipe = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_x0(pipe: HFDDPMPipeline, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """The final latents x_0, [64, 1, 16, 16] float64, taken from the last callback: the images themselves are
    clamped to [0, 1], which would cut N(0.3, 0.5²)'s tails."""
    final = {}

    def keep(pipe, i, t, tensors):
        final["x"] = tensors["latents"]
        return {}

    pipe(
        batch_size=SHAPE[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
        output_type="pt", callback_on_step_end=keep,
    )  # fmt: skip
    return final["x"].double()


def assert_gaussian(x: torch.Tensor, mean: float = MEAN, variance: float = STD**2, bias: float = 0.0) -> None:
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(mean, abs=MEAN_SAMPLING_TOL)
    assert x.var().item() == pytest.approx(variance, abs=VAR_SAMPLING_TOL + bias)


def heun_law(sigmas: list[float]) -> tuple[float, float]:
    """Heun's output law on the oracle, propagated exactly in float64 from Karras et al. 2022, Algorithm 1 (no
    churn): in σ-space x = x_0 + σ ε, the oracle's ODE is d(x - m)/dσ = σ / (s² + σ²) (x - m), so every step scales
    x - m by a number; the last step, to σ = 0, is an Euler step. `sigmas`: the distinct σ, descending, ending at 0."""
    slope = lambda sigma: sigma / (STD**2 + sigma**2)  # noqa: E731
    gain = 1.0
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        euler = 1 + (b - a) * slope(a)
        gain *= euler if b == 0 else 1 + (b - a) * (slope(a) + slope(b) * euler) / 2
    # x_T = √(σ_max² + 1) z, z ~ N(0, I): x - m starts at mean -m
    return MEAN - gain * MEAN, gain**2 * (sigmas[0] ** 2 + 1)


def expected_law(pipe: HFDDPMPipeline, name: str, steps: int = 50) -> tuple[float, float, float]:
    """(mean, variance, allowed discretisation bias of the variance) of `name`'s output on the oracle."""
    if name == "heun":
        heun = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
        heun.set_timesteps(steps)  # its σ list repeats each inner σ (two evaluations)
        return (*heun_law([heun.sigmas[0].item(), *heun.sigmas[1:-1:2].tolist(), 0.0]), 0.0)
    if name not in EULER_ETA:
        return MEAN, STD**2, VAR_HIGHER_ORDER_TOL
    ours = DDIMPosteriorScheduler.from_config(pipe.scheduler.config)
    ours.set_timesteps(steps)  # trailing: Euler's steps, on the same integer timesteps
    alphas_cumprod, timesteps = ours.diffusion.alphas_cumprod, ours.timesteps.tolist()
    return (*exact_sampler_moments(alphas_cumprod, timesteps, EULER_ETA[name], True), 0.0)


@pytest.mark.parametrize("beta_schedule", ["cosine", "linear"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_reproduces_the_data_law_on_the_oracle(name: str, beta_schedule: str) -> None:
    pipe = oracle_pipeline(beta_schedule)
    mean, variance, bias = expected_law(pipe, name)
    pipe.scheduler = SOLVERS[name].from_config(pipe.scheduler.config)
    assert_gaussian(sample_x0(pipe), mean, variance, bias)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_diffusers_ddpm_ddim_match_their_exact_law_on_the_oracle(name: str) -> None:
    """DDPM/DDIM at 50 steps are biased (test_oracle.py); diffusers' own classes in our pipeline hit the exact law."""
    pipe = oracle_pipeline()
    ours = pipe.scheduler
    pipe.scheduler = REFERENCES[name].from_config(ours.config)
    x = sample_x0(pipe)
    ours.set_timesteps(50)
    eta = 1.0 if name == "ddpm" else 0.0
    mean, var = exact_sampler_moments(ours.diffusion.alphas_cumprod, ours.timesteps.tolist(), eta, name == "ddim")
    assert_gaussian(x, mean, var)


@pytest.mark.parametrize("name", ["euler", "heun", "lms"])
def test_oracle_check_fails_without_init_noise_sigma_and_scale_model_input(name, monkeypatch) -> None:
    """The σ-space schedulers sampled as the pipeline did before issue 16 (x_T ~ N(0, I) unscaled, x_t fed raw)."""
    cls = SOLVERS[name]
    monkeypatch.setattr(cls, "init_noise_sigma", 1.0)
    monkeypatch.setattr(cls, "scale_model_input", lambda self, sample, timestep=None: sample)
    pipe = oracle_pipeline()
    mean, variance, bias = expected_law(pipe, name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    with pytest.raises(AssertionError):
        assert_gaussian(sample_x0(pipe), mean, variance, bias)


def test_heun_two_evaluations_per_step_progress_and_callbacks() -> None:
    pipe = oracle_pipeline()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(file=io.StringIO())
    bars, calls = [], []
    progress_bar = pipe.progress_bar
    pipe.progress_bar = lambda *args, **kwargs: bars.append(progress_bar(*args, **kwargs)) or bars[-1]
    out = pipe(
        batch_size=2, num_inference_steps=10, output_type="pt", return_trajectory=True,
        callback_on_step_end=lambda pipe, i, t, tensors: calls.append((i, float(t))) or {},
    )  # fmt: skip
    timesteps = pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == 2 * 10 - 1  # each step but the last evaluates the U-Net twice
    assert calls == list(enumerate(timesteps)) and [s.timestep for s in out.trajectory] == timesteps
    assert bars[0].total == bars[0].n == 10  # the bar counts steps, not U-Net calls


def test_pipeline_keeps_learned_variance_only_for_steps_that_read_it() -> None:
    """A learned-variance model: DDPM steps get [ε, v] (2C channels), solvers get ε only (DPMSolver's own slice is
    [:, :3], wrong for C = 1)."""
    seen = {}

    class Recorder(DPMSolverMultistepScheduler):
        def step(self, model_output, timestep, sample, *args, **kwargs):
            seen["channels"] = model_output.shape[1]
            return super().step(model_output, timestep, sample, *args, **kwargs)

    class TwoHeaded(OracleUNet):
        def forward(self, sample, timestep):
            eps = super().forward(sample, timestep).sample
            return BaseOutput(sample=torch.cat([eps, torch.zeros_like(eps)], dim=1))

    scheduler = DDPMPosteriorScheduler(beta_schedule="cosine", variance_type="learned_range", clip_sample=False)
    pipe = HFDDPMPipeline(unet=TwoHeaded(scheduler.diffusion.alphas_cumprod.tolist()), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = Recorder.from_config(scheduler.config)
    pipe(batch_size=1, num_inference_steps=3, output_type="pt")
    assert seen["channels"] == 1


# ------------------------------------------------------------------------------ configs we save, loaded by them

SAVED_SCHEDULES = {
    "cosine": dict(beta_schedule="cosine"),
    "quadratic": dict(beta_schedule="quadratic"),
    "laplace": dict(beta_schedule="laplace"),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "constant": dict(beta_schedule="constant", beta_end=0.01),
    "linear scaled to T=250": dict(num_train_timesteps=250, scale_betas_with_timesteps=True),
    "callable": dict(num_train_timesteps=300, trained_betas=lambda t: 1e-4 + 0.05 * t / 300),
    "cosine, zero terminal SNR": dict(beta_schedule="cosine", rescale_betas_zero_snr=True),
}


@pytest.fixture(params=sorted(SAVED_SCHEDULES))
def saved_scheduler(request, tmp_path: Path) -> tuple[DDPMPosteriorScheduler, Path]:
    scheduler = DDIMPosteriorScheduler(**SAVED_SCHEDULES[request.param])
    scheduler.save_pretrained(tmp_path)
    return scheduler, tmp_path


@pytest.mark.parametrize("name", sorted({**SOLVERS, **REFERENCES}))
def test_saved_configs_load_into_every_diffusers_scheduler(name, saved_scheduler, caplog) -> None:
    ours, folder = saved_scheduler
    cls = {**SOLVERS, **REFERENCES}[name]
    if ours.config.rescale_betas_zero_snr and "rescale_betas_zero_snr" not in cls._get_init_keys(cls):
        pytest.skip(f"{cls.__name__} has no zero-terminal-SNR option")  # Heun, LMS, DEIS
    with caplog.at_level(logging.WARNING):
        theirs = cls.from_pretrained(folder)
    assert "not expected" not in caplog.text
    expected = ours.diffusion.alphas_cumprod.numpy()
    got = theirs.alphas_cumprod.double().numpy()
    if ours.config.rescale_betas_zero_snr:  # diffusers puts ᾱ_T = 2⁻²⁴ in place of 0 for its σ
        expected, got = expected[:-1], got[:-1]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # ... and back into ours, unchanged and without warnings
    with caplog.at_level(logging.WARNING):
        again = DDIMPosteriorScheduler.from_config(theirs.config)
    assert "not expected" not in caplog.text
    assert torch.equal(again.diffusion.betas, ours.diffusion.betas)
    theirs.set_timesteps(10)
    assert len(theirs.timesteps) >= 10


def test_config_keys_keep_what_our_schedulers_compute() -> None:
    """The added keys change nothing in ours: same β as the plain schedule, and clip_sample's thresholding is the same
    clipping to [-1, 1] (x̂_0 of 1.7 and -3 become 1 and -1, in-range values stay)."""
    cosine = DDPMPosteriorScheduler(beta_schedule="cosine")
    assert cosine.config.beta_schedule == "squaredcos_cap_v2" and cosine.config.lambda_min_clipped == -5.1
    assert torch.equal(cosine.diffusion.betas, GaussianDiffusion(make_betas("cosine")).betas)
    laplace = DDPMPosteriorScheduler(beta_schedule="laplace")
    assert laplace.config.beta_schedule == "laplace" and len(laplace.config.trained_betas) == 1000
    assert torch.equal(laplace.diffusion.betas, GaussianDiffusion(make_betas("laplace")).betas)
    assert cosine.config.thresholding and cosine.config.sample_max_value == 1.0
    x0 = torch.tensor([[1.7, -3.0, 0.25, -0.5]])
    assert torch.equal(cosine._postprocess_x0(x0), torch.tensor([[1.0, -1.0, 0.25, -0.5]]))
    # a user's choice wins: no clipping asked, none written; a user's lambda_min_clipped is kept
    plain = DDPMPosteriorScheduler(beta_schedule="cosine", clip_sample=False)
    assert not plain.config.thresholding
    kept = DDPMPosteriorScheduler.from_config({**cosine.config, "lambda_min_clipped": -4.0})
    assert kept.config.lambda_min_clipped == -4.0
    assert DPMSolverMultistepScheduler.from_config(kept.config).config.lambda_min_clipped == -4.0


# ---------------------------------------------------------------------------------- the trained digits model


@pytest.fixture(scope="module")
def digits_pipe() -> HFDDPMPipeline:
    pipe = HFDDPMPipeline.from_pretrained(SPACE_DIR / "model")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    from hf_ddpm.fid import DigitsClassifierExtractor

    return DigitsClassifierExtractor(cache_dir=tmp_path_factory.mktemp("digits_cache"))


# The σ-space solvers take "leading" spacing here: from the cosine schedule's last step (trailing spacing starts
# there) they leave σ ≈ 2·10⁴ (the capped last β) with an unclipped x̂_0 — Euler, LMS and Euler ancestral have no
# clipping at all, and Heun's trapezoid multiplies its second evaluation's error by σ / σ_next — and the samples blur
# (digits-FID ~40x the floor with trailing spacing, ~1.2x with leading).
SIGMA_SPACE = {"timestep_spacing": "leading"}
DIGITS_RUNS = [
    ("dpmsolver++", 10, {}), ("unipc", 10, {}), ("deis", 10, {}), ("ddim", 20, {}), ("ddpm", 50, {}),
    ("euler", 20, SIGMA_SPACE), ("heun", 10, SIGMA_SPACE), ("lms", 20, SIGMA_SPACE), ("euler_ancestral", 20, SIGMA_SPACE),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps", "overrides"), DIGITS_RUNS)
def test_digits_model_gives_all_ten_digits(name, steps, overrides, digits_pipe, digits_classifier) -> None:
    """The bundled model (cosine schedule, trained with x̂_0 clipping), each scheduler from its config."""
    ours = digits_pipe.scheduler
    digits_pipe.scheduler = {**SOLVERS, **REFERENCES}[name].from_config(ours.config, **overrides)
    try:
        images = digits_pipe(
            batch_size=200, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
    finally:
        digits_pipe.scheduler = ours
    report = digits_classifier.report(images)
    assert report["classes_present"] == 10, report["class_histogram"]
    assert report["mean_confidence"] > 0.8
