"""Negative log-likelihood in bits/dim: the full variational bound of Ho et al. 2020 (eq. 5) for 8-bit images.

L = L_T + Σ_{t≥1} L_{t-1} + L_0, where L_T is the prior KL, L_{t-1} the KL between the posterior and the model's
reverse step, and L_0 the discretized Gaussian decoder. Exact mode evaluates every t; fast mode estimates Σ L_t from
a stratified sample of t and reports its standard error. All terms come from `diffusion.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .diffusion import GaussianDiffusion, nats_to_bits_per_dim
from .progress import progress_bar

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BitsPerDim:
    """The bound per image, in bits/dim.

    Args:
        total: [N] the whole bound (prior + Σ terms + decoder).
        prior: [N] L_T.
        decoder: [N] L_0.
        terms: [T] the mean over images of each L_{t-1}, t = 1..T-1 at index t (NaN where fast mode did not sample);
            index 0 holds L_0.
        stderr: [N] standard error of `total` from sampling t (zeros in exact mode).
    """

    total: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    terms: torch.Tensor
    stderr: torch.Tensor

    @property
    def mean(self) -> float:
        """The dataset bits/dim: the mean of `total`."""
        return self.total.mean().item()

    @property
    def mean_stderr(self) -> float:
        """Standard error of `mean` from sampling t (images' errors are independent)."""
        return (self.stderr**2).sum().sqrt().item() / len(self.stderr)


def _model_output(model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x_t, t)
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def vlb_terms_at(
    model: Model,
    process: GaussianDiffusion,
    x0: torch.Tensor,
    t_value: int,
    prediction_type: str,
    variance_type: str,
    generator: torch.Generator | None = None,
    decoder: Literal["discretized", "gaussian"] = "discretized",
    clip_denoised: bool = True,
    model_variance: float | None = None,
) -> torch.Tensor:
    """L_{t-1} (or L_0 at t = 0) for every image at one timestep, in nats/dim: x0 [N, C, H, W] -> [N].

    `t_value` indexes `process`; a respaced process (`GaussianDiffusion.respace`) calls the model with the training
    timestep of that step. `model_variance` replaces the reverse step's variance (e.g. the analytic σ*²).
    """
    t = torch.full((x0.shape[0],), t_value, dtype=torch.long, device=x0.device)
    # Drawn where the generator lives, so that a CPU generator serves a GPU model (and gives the same noise).
    where = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=where).to(x0.device)
    x_t = process.q_sample(x0, t, noise)
    model_input_dtype = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else x0.dtype
    timestep_map = getattr(process, "timestep_map", None)
    model_t = t if timestep_map is None else timestep_map.to(t.device)[t]
    output = _model_output(model, x_t.to(model_input_dtype), model_t).to(x0.dtype)
    out = process.p_mean_variance(output, x_t, t, prediction_type, variance_type, clip_denoised=clip_denoised)
    log_variance = out["log_variance"]
    if model_variance is not None:
        log_variance = torch.full_like(log_variance, math.log(model_variance))
    return process.vlb_term(x0, x_t, t, out["mean"], log_variance, decoder=decoder)


def _strata(num_timesteps: int, num_strata: int) -> list[tuple[int, int]]:
    """Split t = 1..T-1 into contiguous strata growing geometrically: [(start, stop), ...].

    Small t carry the largest and most variable terms (β̃_t is tiny there), so they get strata of one step, which
    are evaluated exactly; large t, where the terms are small and smooth, share wide strata.
    """
    edges = torch.logspace(0, math.log10(num_timesteps), num_strata + 1, dtype=torch.float64).round().long()
    edges = torch.unique(torch.cat([edges, torch.tensor([1, num_timesteps])])).tolist()
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _bits_per_dim_from_nats(
    prior: torch.Tensor,
    sum_nats: torch.Tensor,
    decoder_nats: torch.Tensor,
    terms: torch.Tensor,
    variance_nats: torch.Tensor | None = None,
) -> BitsPerDim:
    """The bound's parts in nats/dim ([N] each; `terms` [T]; `variance_nats` of Σ terms, None: exact) in bits/dim."""
    prior = prior.to(sum_nats.device)
    variance_nats = torch.zeros_like(sum_nats) if variance_nats is None else variance_nats
    return BitsPerDim(
        total=nats_to_bits_per_dim(prior + sum_nats + decoder_nats).cpu(),
        prior=nats_to_bits_per_dim(prior).cpu(),
        decoder=nats_to_bits_per_dim(decoder_nats).cpu(),
        terms=nats_to_bits_per_dim(terms),
        stderr=nats_to_bits_per_dim(variance_nats.sqrt()).cpu(),
    )


@torch.no_grad()
def bits_per_dim(
    model: Model,
    process: GaussianDiffusion,
    x0: torch.Tensor,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    mode: Literal["exact", "fast"] = "exact",
    num_strata: int = 32,
    samples_per_stratum: int = 2,
    generator: torch.Generator | None = None,
    decoder: Literal["discretized", "gaussian"] = "discretized",
    clip_denoised: bool = True,
    progress: bool = False,
) -> BitsPerDim:
    """The variational bound of one batch x0 ([N, C, H, W] in [-1, 1]) in bits/dim (Ho et al. 2020, eq. 5).

    Exact mode evaluates every t. Fast mode evaluates L_0 exactly and, in each of up to `num_strata` geometric
    strata of t, `samples_per_stratum` t drawn without replacement: Σ L_t ≈ Σ_k |stratum k| · mean of its draws,
    with the stratified standard error. The same t draws serve the whole batch.
    """
    if mode not in ("exact", "fast"):
        raise ValueError(f"Unknown mode {mode!r}; allowed: 'exact', 'fast'.")
    T = process.num_timesteps
    kwargs = dict(generator=generator, decoder=decoder, clip_denoised=clip_denoised)
    terms = torch.full((T,), float("nan"), dtype=torch.float64)
    decoder_nats = vlb_terms_at(model, process, x0, 0, prediction_type, variance_type, **kwargs).double()
    terms[0] = decoder_nats.mean()
    sum_nats = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    variance_nats = torch.zeros_like(sum_nats)
    if mode == "exact" or T == 1:
        for t_value in progress_bar(range(1, T), disable=not progress, desc="bits/dim"):
            values = vlb_terms_at(model, process, x0, t_value, prediction_type, variance_type, **kwargs).double()
            terms[t_value] = values.mean()
            sum_nats += values
    else:
        if samples_per_stratum < 2:
            raise ValueError(f"samples_per_stratum must be >= 2 to estimate an error, got {samples_per_stratum}.")
        strata = _strata(T, min(num_strata, T - 1))
        for start, stop in progress_bar(strata, disable=not progress, desc="bits/dim (fast)"):
            size = stop - start
            count = min(samples_per_stratum, size)  # drawn without replacement: a small stratum is exact
            draws = (start + torch.randperm(size, generator=generator)[:count]).tolist()
            values = torch.stack(
                [vlb_terms_at(model, process, x0, t, prediction_type, variance_type, **kwargs).double() for t in draws]
            )
            for t_value, value in zip(draws, values):
                terms[t_value] = value.mean()
            sum_nats += size * values.mean(0)
            if count < size:  # with the finite-population correction
                variance_nats += size**2 * values.var(0) / count * (1 - count / size)
    return _bits_per_dim_from_nats(process.prior_kl(x0.double()), sum_nats, decoder_nats, terms, variance_nats)


def dataset_bits_per_dim(
    model: Model,
    process: GaussianDiffusion,
    batches: Iterable[torch.Tensor],
    seed: int = 0,
    **kwargs,
) -> BitsPerDim:
    """`bits_per_dim` over batches of images ([B, C, H, W] in [-1, 1]), concatenated; deterministic under `seed`."""
    generator = torch.Generator().manual_seed(seed)
    results = [bits_per_dim(model, process, batch, generator=generator, **kwargs) for batch in batches]
    if not results:
        raise ValueError("dataset_bits_per_dim got no batches: the dataset is empty.")
    counts = torch.tensor([len(r.total) for r in results], dtype=torch.float64)
    weights = counts / counts.sum()
    terms = torch.stack([r.terms for r in results])
    term_means = torch.where(
        torch.isnan(terms).all(0), float("nan"), (torch.nan_to_num(terms) * weights[:, None]).sum(0)
    )
    return BitsPerDim(
        total=torch.cat([r.total for r in results]),
        prior=torch.cat([r.prior for r in results]),
        decoder=torch.cat([r.decoder for r in results]),
        terms=term_means,
        stderr=torch.cat([r.stderr for r in results]),
    )


@torch.no_grad()
def respaced_bits_per_dim(
    model: Model,
    process: GaussianDiffusion,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    analytic_gamma: torch.Tensor | Sequence[float] | None = None,
    data_half_range: float | None = 1.0,
    generator: torch.Generator | None = None,
    decoder: Literal["discretized", "gaussian"] = "discretized",
    clip_denoised: bool = True,
    progress: bool = False,
) -> BitsPerDim:
    """The variational bound of the K-step process over `timesteps` (K training timesteps, any order) in bits/dim,
    for one batch x0 ([N, C, H, W]): Bao et al. 2022's NLL against K (their Table 1).

    L = L_K + Σ_{k≥1} KL(q(x_{t_{k-1}} | x_{t_k}, x_0) ‖ p(x_{t_{k-1}} | x_{t_k})) + L_0, every term exact over k.
    The reverse variance is `variance_type`'s fixed one of each respaced step or, given the model's calibration
    `analytic_gamma` (Γ for every timestep of `process`, [T]), the optimal σ*² (`GaussianDiffusion.analytic_variance`
    with λ² = β̃, bounded for data in [-r, r] by `data_half_range` r; None: unbounded data). The decoder L_0 keeps the
    fixed variance in both cases, as in Bao et al.'s likelihood code, so the two bounds differ only in their KL terms;
    pass the same seeded `generator` state to compare them on the same noise. `terms` is indexed by step k ([K]).
    """
    respaced = process.respace(timesteps)
    K = respaced.num_timesteps
    variances = [None] * K
    if analytic_gamma is not None:
        gamma = torch.as_tensor(analytic_gamma, dtype=torch.float64)
        if gamma.shape != (process.num_timesteps,):
            raise ValueError(
                f"analytic_gamma must hold {process.num_timesteps} values (one per timestep), got {tuple(gamma.shape)}."
            )
        variances = [None] + respaced.analytic_variance(gamma[respaced.timestep_map], 1.0, data_half_range)[
            1:
        ].tolist()
    kwargs = dict(generator=generator, decoder=decoder, clip_denoised=clip_denoised)
    terms = torch.empty(K, dtype=torch.float64)
    sum_nats = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    decoder_nats = sum_nats
    for k in progress_bar(range(K), disable=not progress, desc=f"bits/dim ({K} steps)"):
        values = vlb_terms_at(
            model, respaced, x0, k, prediction_type, variance_type, **kwargs, model_variance=variances[k]
        )
        values = values.double()
        terms[k] = values.mean()
        if k == 0:
            decoder_nats = values
        else:
            sum_nats = sum_nats + values
    return _bits_per_dim_from_nats(respaced.prior_kl(x0.double()), sum_nats, decoder_nats, terms)
