"""Sampler accuracy on a known answer: data x_0 ~ N(m, s²), whose exact ε-model is closed-form.

Prints, per sampler, the sample mean and variance against m and s² (the discretization bias of each sampler).
Run: python benchmarks/bench_oracle.py
"""

import torch

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler

MEAN, STD, SHAPE = 0.3, 0.5, (256, 1, 16, 16)


def oracle_eps(x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """E[ε | x_t] for Gaussian data: √(1-ᾱ) (x_t - √ᾱ m) / (ᾱ s² + 1 - ᾱ)."""
    return (1 - alpha_bar) ** 0.5 * (x_t - alpha_bar**0.5 * MEAN) / (alpha_bar * STD**2 + 1 - alpha_bar)


def oracle_gamma(scheduler) -> list[float]:
    """Γ_t = E‖ε̂‖²/d of the oracle in closed form, (1 - ᾱ) / (ᾱ s² + 1 - ᾱ): the calibration `hf_ddpm.calibrate`
    estimates for a trained model."""
    alpha_bar = scheduler.diffusion.alphas_cumprod
    return ((1 - alpha_bar) / (alpha_bar * STD**2 + 1 - alpha_bar)).tolist()


def analytic(cls):
    """A scheduler with the analytic variance (Bao et al. 2022) from the oracle's Γ; continuous data: no clipping."""
    return cls(clip_sample=False, analytic_variance=True, analytic_gamma=oracle_gamma(cls()))


def sample(scheduler, steps: int, corrector_steps: int = 0, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=generator)
    for t in scheduler.timesteps.tolist():
        alpha_bar = scheduler.diffusion.alphas_cumprod[t].item()
        for _ in range(corrector_steps):
            x = scheduler.langevin_step(oracle_eps(x, alpha_bar), t, x, generator=generator)
        x = scheduler.step(oracle_eps(x, alpha_bar), t, x, generator=generator, **kwargs).prev_sample
    return x


def main() -> None:
    print(f"data N({MEAN}, {STD**2}); {SHAPE[0] * SHAPE[2] * SHAPE[3]} samples; linear β, T=1000")
    print(f"{'sampler':34s} {'mean':>8s} {'variance':>9s} {'var. bias':>9s}")
    runs = [
        ("DDPM ancestral, 1000 steps", DDPMPosteriorScheduler(clip_sample=False), 1000, {}),
        (
            "DDPM + Langevin (r=0.1), 1000",
            DDPMPosteriorScheduler(clip_sample=False, corrector_snr=0.1),
            1000,
            {"corrector_steps": 1},
        ),
        ("DDPM respaced, 100 steps", DDPMPosteriorScheduler(clip_sample=False), 100, {}),
        ("DDIM η=0, 50 steps", DDIMPosteriorScheduler(clip_sample=False), 50, {"eta": 0.0}),
        ("DDIM η=1, 50 steps", DDIMPosteriorScheduler(clip_sample=False), 50, {"eta": 1.0}),
        ("DDIM η=0, 200 steps", DDIMPosteriorScheduler(clip_sample=False), 200, {"eta": 0.0}),
        ("DDPM respaced, 100, analytic var.", analytic(DDPMPosteriorScheduler), 100, {}),
        ("DDPM respaced, 10, fixed var.", DDPMPosteriorScheduler(clip_sample=False), 10, {}),
        ("DDPM respaced, 10, analytic var.", analytic(DDPMPosteriorScheduler), 10, {}),
        ("DDIM η=0, 50, analytic var.", analytic(DDIMPosteriorScheduler), 50, {"eta": 0.0}),
        ("DDIM η=1, 50, analytic var.", analytic(DDIMPosteriorScheduler), 50, {"eta": 1.0}),
        ("DDIM η=0, 10, fixed var.", DDIMPosteriorScheduler(clip_sample=False), 10, {"eta": 0.0}),
        ("DDIM η=0, 10, analytic var.", analytic(DDIMPosteriorScheduler), 10, {"eta": 0.0}),
    ]
    for name, scheduler, steps, kwargs in runs:
        x = sample(scheduler, steps, **kwargs)
        bias = (x.var().item() - STD**2) / STD**2
        print(f"{name:34s} {x.mean().item():8.4f} {x.var().item():9.4f} {bias:+9.1%}")


if __name__ == "__main__":
    main()
