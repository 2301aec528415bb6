"""EDM preconditioning, diffusion-forcing noise and loss, and the few-step next-frame sampler."""

import math

import pytest
import torch
from torch import nn

from worldsim.diffusion.edm import EDMConfig, EDMPrecond, edm_loss_weight
from worldsim.diffusion.forcing import (
    DiffusionForcingLoss,
    ForcingConfig,
    masked_denoising_loss,
    sample_training_noise,
)
from worldsim.diffusion.sampler import (
    SIGMA_MAX,
    karras_sigmas,
    num_denoiser_calls,
    sample_next_frame,
    sample_next_frames,
)




class Recorder(nn.Module):
    """Raw network that records its inputs and returns a fixed output."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x_in, c_noise, *args, **kwargs):
        self.x_in, self.c_noise, self.args, self.kwargs = x_in, c_noise, args, kwargs
        return self.out


class FrameMLP(nn.Module):
    """Per-frame MLP on (x_in, c_noise): the smallest network EDMPrecond can wrap."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                               nn.Linear(width, 2))

    def forward(self, x_in, c_noise):  # (B, T, 2, 1, 1), (B, T)
        B, T = c_noise.shape
        h = torch.cat([x_in.reshape(B, T, 2), c_noise[..., None]], -1)  # (B, T, 3)
        return self.f(h).view(B, T, 2, 1, 1)


# ---------------------------------------------------------------------------------------------
# Preconditioning


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_precond_matches_edm_formulas_per_frame(sigma_data):
    g = torch.Generator().manual_seed(0)
    B, T, C, h, w = 2, 3, 4, 2, 2
    x = torch.randn(B, T, C, h, w, generator=g, dtype=torch.float64)
    f = torch.randn(B, T, C, h, w, generator=g, dtype=torch.float64)
    sigma = torch.tensor([[0.01, 0.7, 12.0], [2.0, 0.3, 80.0]], dtype=torch.float64)
    net = Recorder(f)
    out = EDMPrecond(net, EDMConfig(sigma_data=sigma_data))(x, sigma, "actions", cache="c")

    for b in range(B):
        for t in range(T):
            s = sigma[b, t].item()
            c_skip = sigma_data**2 / (s**2 + sigma_data**2)
            c_out = s * sigma_data / math.sqrt(s**2 + sigma_data**2)
            c_in = 1 / math.sqrt(s**2 + sigma_data**2)
            torch.testing.assert_close(net.x_in[b, t], c_in * x[b, t])
            assert net.c_noise[b, t].item() == pytest.approx(math.log(s) / 4)
            torch.testing.assert_close(out[b, t], c_skip * x[b, t] + c_out * f[b, t])
            # lambda(sigma) * c_out^2 = 1: unit-variance effective target at every noise level.
            assert edm_loss_weight(sigma[b, t], sigma_data).item() * c_out**2 == pytest.approx(1)
    assert net.args == ("actions",) and net.kwargs == {"cache": "c"}
    assert net.c_noise.shape == (B, T)


def test_clean_frames_pass_through_exactly_with_a_finite_embedding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 2, 2, generator=g)
    sigma = torch.tensor([[0.0, 0.0, 0.5, 3.0], [0.0, 1.0, 0.0, 0.0]])
    # A network that blows up must not leak into context frames.
    wild = torch.full_like(x, 1e30)
    wild[0, 0] = float("inf")
    net = Recorder(wild)
    out = EDMPrecond(net)(x, sigma)
    clean = sigma == 0
    assert torch.equal(out[clean], x[clean])
    assert not torch.equal(out[~clean], x[~clean])
    assert torch.isfinite(net.c_noise).all()
    # Clean frames get one shared embedding, below any noise level the sampler uses.
    assert torch.unique(net.c_noise[clean]).numel() == 1
    assert net.c_noise[clean][0] < math.log(0.002) / 4


def test_precond_rejects_mismatched_sigma_shape():
    pre = EDMPrecond(Recorder(torch.zeros(1)))
    with pytest.raises(ValueError, match=r"sigma \(B, T\)"):
        pre(torch.zeros(2, 3, 1, 1, 1), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# Diffusion-forcing noise


def _prefix_lengths(mask: torch.Tensor) -> torch.Tensor:
    return (~mask).sum(1)


@pytest.mark.parametrize("T", [3, 8, 9])
def test_noise_prefix_statistics(T):
    B = 20000
    sigma, mask = sample_training_noise(B, T, torch.Generator().manual_seed(2))
    assert sigma.shape == mask.shape == (B, T) and mask.dtype == torch.bool
    length = _prefix_lengths(mask)
    has = length > 0
    assert has.float().mean().item() == pytest.approx(0.5, abs=0.02)
    # Strictly more than half the window, strictly less than all of it, every length used.
    assert set(length[has].tolist()) == set(range(T // 2 + 1, T))
    # The excluded frames are exactly a prefix, at noise 0; every loss frame is noised.
    frame = torch.arange(T)
    assert torch.equal(mask, frame[None, :] >= length[:, None])
    assert torch.equal(sigma == 0, ~mask)
    assert (sigma[mask] > 0).all()


def test_noise_levels_are_lognormal_and_independent_per_frame():
    cfg = ForcingConfig(p_mean=-0.4, p_std=1.2, p_long_context=0.0)
    sigma, mask = sample_training_noise(50000, 6, torch.Generator().manual_seed(3), cfg)
    assert mask.all()
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-0.4, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.02)
    corr = torch.corrcoef(log_sigma.T)  # (6, 6) across frames
    off_diagonal = corr[~torch.eye(6, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 0.03
    # Within one window the frames do differ (not one shared level per sample).
    assert (log_sigma.std(1) > 0.1).float().mean().item() > 0.99


def test_noise_is_deterministic_with_a_seed_and_p_is_respected():
    a = sample_training_noise(64, 10, torch.Generator().manual_seed(4))
    b = sample_training_noise(64, 10, torch.Generator().manual_seed(4))
    c = sample_training_noise(64, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    _, always = sample_training_noise(500, 10, None, ForcingConfig(p_long_context=1.0))
    _, never = sample_training_noise(500, 10, None, ForcingConfig(p_long_context=0.0))
    assert (_prefix_lengths(always) > 5).all() and never.all()


def test_frames_after_a_clean_prefix_can_be_kept_noisy():
    """min_sigma_after_prefix: in windows with a prefix the frames after it draw ln sigma from the
    same normal cut below at the floor; windows without a prefix, the prefix and the mask are those
    of the plain draw."""
    plain_cfg, cfg = ForcingConfig(p_mean=0.3, p_std=1.2), ForcingConfig(p_mean=0.3, p_std=1.2, min_sigma_after_prefix=2.0)
    plain, plain_mask = sample_training_noise(40000, 12, torch.Generator().manual_seed(6), plain_cfg)
    sigma, mask = sample_training_noise(40000, 12, torch.Generator().manual_seed(6), cfg)
    assert torch.equal(mask, plain_mask)
    prefixed = (~mask).any(1)
    assert torch.equal(sigma[~prefixed], plain[~prefixed]) and torch.equal(sigma == 0, ~mask)
    after = sigma[prefixed[:, None] & mask]
    assert after.min().item() >= 2.0
    # The cut normal: its median is the plain normal's quantile halfway between the floor's and 1.
    floor = torch.special.ndtr(torch.tensor((math.log(2.0) - 0.3) / 1.2)).item()
    expected = math.exp(0.3 + 1.2 * torch.special.ndtri(torch.tensor((1 + floor) / 2)).item())
    assert after.median().item() == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="min_sigma_after_prefix"):
        sample_training_noise(4, 8, cfg=ForcingConfig(min_sigma_after_prefix=-1.0))


def test_noise_rejects_windows_too_short_for_a_prefix():
    with pytest.raises(ValueError, match="T >= 3"):
        sample_training_noise(4, 2)
    sigma, mask = sample_training_noise(4, 2, cfg=ForcingConfig(p_long_context=0.0))
    assert mask.all() and (sigma > 0).all()


# ---------------------------------------------------------------------------------------------
# Loss


class PerfectNet(nn.Module):
    """Raw network that knows the clean window: inverts the preconditioning to output exactly the
    F for which D(x; sigma) = clean, so the loss sees a perfect denoiser through EDMPrecond."""

    def __init__(self, clean: torch.Tensor, sigma_data: float):
        super().__init__()
        self.clean, self.sd = clean, sigma_data

    def forward(self, x_in, c_noise):
        sigma = (4 * c_noise).exp()[:, :, None, None, None]
        var = sigma**2 + self.sd**2
        x = x_in * var.sqrt()  # undo c_in
        return (self.clean - self.sd**2 / var * x) / (sigma * self.sd / var.sqrt())


def test_loss_is_zero_for_a_perfect_denoiser():
    clean = torch.randn(8, 6, 2, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pre = EDMPrecond(PerfectNet(clean, 0.5), EDMConfig(sigma_data=0.5))
    loss = DiffusionForcingLoss()(pre, clean, generator=torch.Generator().manual_seed(7))
    assert 0 <= loss.item() < 1e-20
    # ...and clearly positive for an imperfect one.
    pre_off = EDMPrecond(PerfectNet(clean + 0.1, 0.5), EDMConfig(sigma_data=0.5))
    assert DiffusionForcingLoss()(pre_off, clean, generator=torch.Generator().manual_seed(7)) > 1e-3


def test_loss_weights_and_averages_over_loss_frames_only():
    clean = torch.zeros(2, 3, 1, 2, 2)
    denoised = torch.zeros(2, 3, 1, 2, 2)
    denoised[0, 2] = 2.0  # squared error 4 on one loss frame
    denoised[1, 0] = 100.0  # huge error on a masked (context) frame: must not count
    sigma = torch.tensor([[0.0, 1.0, 0.5], [0.0, 2.0, 2.0]])
    mask = sigma > 0
    loss = masked_denoising_loss(denoised, clean, sigma, mask, sigma_data=1.0)
    lam = (0.5**2 + 1) / 0.5**2
    assert loss.item() == pytest.approx(lam * 4 / 4)  # 4 loss frames in the batch


def test_loss_with_every_frame_masked_is_zero_not_nan():
    pre = EDMPrecond(FrameMLP())
    clean = torch.randn(3, 4, 2, 1, 1)
    sigma = torch.zeros(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss = masked_denoising_loss(pre(clean, sigma), clean, sigma, mask, 1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in pre.parameters())


# ---------------------------------------------------------------------------------------------
# Sampler


def test_karras_schedule():
    s = karras_sigmas(4, sigma_min=0.1, sigma_max=5.0, rho=7.0)
    assert s.shape == (5,) and s[-1] == 0
    assert s[0].item() == pytest.approx(5.0) and s[-2].item() == pytest.approx(0.1)
    assert (s[1:] < s[:-1]).all()
    # Evenly spaced in sigma^(1/rho).
    inner = s[:-1] ** (1 / 7)
    torch.testing.assert_close(inner.diff(), inner.diff()[:1].expand(3))
    assert karras_sigmas(1, 0.1, 5.0).tolist() == [5.0, 0.0]


def _counting(fn):
    calls = []

    def wrapped(x, sigma):
        assert sigma.shape == (x.shape[0],)
        calls.append(sigma[0].item())
        return fn(x, sigma)

    return wrapped, calls


@pytest.mark.parametrize("solver", ["dpm2m", "euler", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_returns_the_data_point_for_a_point_mass(solver, steps):
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fn, calls = _counting(lambda x, sigma: x0.expand_as(x))
    out = sample_next_frame(fn, x0.shape, steps, torch.Generator().manual_seed(9), solver=solver,
                            dtype=torch.float64)
    torch.testing.assert_close(out, x0)
    assert len(calls) == num_denoiser_calls(steps, solver)
    assert calls[0] == pytest.approx(SIGMA_MAX)


def _gaussian_oracle(mu: float, s: float):
    """Ideal denoiser for data ~ N(mu, s^2): E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def denoise(x, sigma):
        sigma = sigma.view(-1, *([1] * (x.dim() - 1)))
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return denoise


def _exact_ode_endpoint(x_start, mu, s, sigma_max):
    # The probability-flow ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant for Gaussian data.
    return mu + s / math.sqrt(s**2 + sigma_max**2) * (x_start - mu)


def test_sampler_follows_the_exact_ode_for_gaussian_data_in_four_steps():
    mu, s, n = 0.3, 1.0, 20000
    shape = (n, 1, 1, 1)
    out = sample_next_frame(_gaussian_oracle(mu, s), shape, 4, torch.Generator().manual_seed(10),
                            dtype=torch.float64)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * SIGMA_MAX
    exact = _exact_ode_endpoint(start, mu, s, SIGMA_MAX)
    assert (out - exact).abs().max().item() < 0.08
    assert out.std().item() == pytest.approx(exact.std().item(), rel=0.03)
    # The same 4 calls with Euler collapse the spread (the few-step blur dpm2m avoids).
    euler = sample_next_frame(_gaussian_oracle(mu, s), shape, 4, torch.Generator().manual_seed(10),
                              solver="euler", dtype=torch.float64)
    assert euler.std().item() < 0.85 * exact.std().item()


@pytest.mark.parametrize("solver,steps", [("euler", 400), ("heun", 40), ("dpm2m", 60)])
def test_every_solver_converges_to_the_exact_ode(solver, steps):
    mu, s = -0.2, 0.5
    shape = (500, 1, 1, 1)
    out = sample_next_frame(_gaussian_oracle(mu, s), shape, steps, torch.Generator().manual_seed(11),
                            solver=solver, sigma_min=0.002, dtype=torch.float64)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * SIGMA_MAX
    assert (out - _exact_ode_endpoint(start, mu, s, SIGMA_MAX)).abs().max().item() < 0.015


def test_final_extrapolation_pushes_the_last_estimate_along_its_change():
    mu, s, w = 0.0, 1.0, 0.7
    shape = (20000, 1, 1, 1)
    oracle, estimates = _gaussian_oracle(mu, s), []

    def recording(x, sigma):
        estimates.append(oracle(x, sigma))
        return estimates[-1]

    settings = {"sigma_max": 20.0, "sigma_min": 2.3, "dtype": torch.float64}
    out = sample_next_frame(recording, shape, 2, torch.Generator().manual_seed(13), final_extrapolation=w, **settings)
    assert len(estimates) == 2
    torch.testing.assert_close(out, estimates[1] + w * (estimates[1] - estimates[0]))
    # Two calls from 20 return the blurred mean of a wide step; the extrapolation gives back part
    # of the spread the exact ODE keeps (0.37 -> 0.60 of it here).
    plain = sample_next_frame(oracle, shape, 2, torch.Generator().manual_seed(13), **settings)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 20.0
    exact = _exact_ode_endpoint(start, mu, s, 20.0).std().item()
    assert plain.std().item() < 0.4 * exact and 0.55 * exact < out.std().item() < 0.65 * exact
    # A point mass stays exact (the estimates agree), and a negative weight is refused.
    x0 = torch.tensor([[0.5, -1.0, 2.0]])
    torch.testing.assert_close(sample_next_frame(lambda x, _: x0.expand_as(x), (1, 3), 2, None, final_extrapolation=w), x0)
    with pytest.raises(ValueError, match="final_extrapolation"):
        sample_next_frame(oracle, (1, 3), 2, None, final_extrapolation=-0.5)


def test_churn_is_off_by_default_and_seeded_when_on():
    oracle = _gaussian_oracle(0.0, 1.0)
    a = sample_next_frame(oracle, (4, 3), 4, torch.Generator().manual_seed(12))
    b = sample_next_frame(oracle, (4, 3), 4, torch.Generator().manual_seed(12))
    c = sample_next_frame(oracle, (4, 3), 4, torch.Generator().manual_seed(12), churn=2.0)
    d = sample_next_frame(oracle, (4, 3), 4, torch.Generator().manual_seed(12), churn=2.0)
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c)
    # With churn the point mass is still recovered: noise is added, then denoised away.
    x0 = torch.tensor([[0.5, -1.0, 2.0]])
    out = sample_next_frame(lambda x, s: x0.expand_as(x), (1, 3), 4, None, churn=5.0)
    torch.testing.assert_close(out, x0)


def test_batched_streams_do_not_depend_on_their_batch_mates():
    def denoise(x, sigma):  # row-independent, nonlinear
        return torch.tanh(x) * (1 / (1 + sigma.view(-1, 1, 1, 1)))

    seeds = [20, 21, 22]
    batch = sample_next_frames(denoise, (3, 2, 3, 3), [torch.Generator().manual_seed(s) for s in seeds],
                               churn=1.0)
    for row, seed in enumerate(seeds):
        alone = sample_next_frame(denoise, (1, 2, 3, 3), 4, torch.Generator().manual_seed(seed), churn=1.0)
        torch.testing.assert_close(batch[row : row + 1], alone)
    with pytest.raises(ValueError, match="one generator per stream"):
        sample_next_frames(denoise, (2, 1), [torch.Generator()])


# ---------------------------------------------------------------------------------------------
# End to end: train with the loss, sample with 4 steps

POINTS = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])


def test_tiny_denoiser_trained_with_the_loss_samples_the_two_points(one_thread):
    torch.manual_seed(0)
    pre = EDMPrecond(FrameMLP(), EDMConfig(sigma_data=0.8))
    loss_fn = DiffusionForcingLoss()  # long-context prefixes on: T = 4 windows
    opt = torch.optim.Adam(pre.parameters(), lr=3e-3)
    steps = 1000
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        clean = POINTS[torch.randint(0, 2, (256, 4), generator=g)][..., None, None]  # (B, T, 2, 1, 1)
        loss = loss_fn(pre, clean, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()

    @torch.no_grad()
    def denoise(x, sigma):  # one new frame, no context
        return pre(x[:, None], sigma[:, None])[:, 0]

    out = sample_next_frame(denoise, (1000, 2, 1, 1), 4, torch.Generator().manual_seed(1))[..., 0, 0]
    dist, nearest = torch.cdist(out, POINTS).min(1)
    # The two points are 2.2 apart; their midpoint (where a blurry sampler ends) is 1.1 from both.
    assert (dist < 0.15).float().mean().item() > 0.85
    assert dist.median().item() < 0.07
    assert 0.35 < nearest.float().mean().item() < 0.65  # both modes, roughly equally
