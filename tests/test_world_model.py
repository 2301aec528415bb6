"""World model: config and presets, parallel == streaming for every variant, adaLN-Zero init,
input errors, loss alignment, gradients, and the loss falling on a fixed batch."""

import json
import math

import pytest
import torch

from worldsim.diffusion.edm import edm_coefficients
from worldsim.diffusion.forcing import ForcingConfig
from worldsim.model.conditioning import shift_actions
from worldsim.model.config import PRESETS, VARIANTS, ModelConfig, make_config
from worldsim.model.loss import world_model_loss
from worldsim.model.world_model import WorldModel, WorldModelOutput, parameter_count

C, GRID = 4, (4, 4)


def tiny_config(variant: str, **kw) -> ModelConfig:
    # A 4x4 token grid with blocks (2, 2) and (4, 4); a 3-frame attention window so the KV ring
    # wraps within the clips below; SSM chunks of 8 tokens so scans cross chunk boundaries.
    window = None if variant in ("causal_full", "mamba_only") else 3
    kw = {"latent_channels": C, "latent_grid": GRID, "attn_window": window, "ssm_chunk_size": 8, **kw}
    return make_config("tiny", variant, **kw)


def perturbed_model(cfg: ModelConfig, dtype=torch.float32, seed=0) -> WorldModel:
    """A model whose zero-initialised tensors (adaLN-Zero, output layer) are made non-zero, so
    every branch contributes and a test of the whole function is not a test of the skip path."""
    torch.manual_seed(seed)
    model = WorldModel(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.2)
    return model


def random_inputs(cfg: ModelConfig, B: int, T: int, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, cfg.latent_channels, *cfg.latent_grid, generator=g, dtype=dtype)
    sigma = torch.rand(B, T, generator=g, dtype=dtype) * 3
    sigma[:, ::3] = 0  # clean frames mixed in, as in the sampler's committed context
    if cfg.action_kind == "discrete":
        actions = torch.randint(0, cfg.n_actions + 1, (B, T), generator=g)
    else:
        actions = torch.randn(B, T, cfg.action_dim, generator=g, dtype=dtype)
    return x, sigma, actions


def stack_outputs(outs: list[WorldModelOutput]) -> WorldModelOutput:
    return WorldModelOutput(*(torch.stack([getattr(o, f) for o in outs], 1)
                              for f in ("denoised", "reward", "termination_logit")))


def assert_outputs_close(a: WorldModelOutput, b: WorldModelOutput, tol: float) -> None:
    for f in ("denoised", "reward", "termination_logit"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=tol, rtol=tol, msg=f)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip_through_json(preset, variant):
    cfg = make_config(preset, variant)
    assert cfg.variant == variant
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_and_missing_keys():
    d = PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match="unknown ModelConfig keys.*n_layer"):
        ModelConfig.from_dict({**d, "n_layer": 3})
    del d["d_model"]
    with pytest.raises(ValueError, match="missing required keys.*d_model"):
        ModelConfig.from_dict(d)


def test_variants_set_their_knobs():
    full = make_config("small", "causal_full")
    assert (full.has_ssm, full.has_attention, full.attn_window, full.ssm_blocks) == (False, True, None, ())
    window = make_config("small", "causal_window")
    assert not window.has_ssm and window.attn_window >= 16
    mamba = make_config("small", "mamba_only")
    assert mamba.has_ssm and not mamba.has_attention and mamba.ssm_blocks == PRESETS["small"].ssm_blocks
    flat = make_config("small", "no_blockwise")
    assert flat.has_attention and all(b == flat.token_grid for b in flat.ssm_blocks)
    ours = make_config("small")
    assert ours.attn_window == 9 and min(b[0] for b in ours.ssm_blocks) < ours.token_grid[0]
    # The variant's blocks follow an overridden grid / patch.
    assert make_config("tiny", "no_blockwise", latent_grid=(16, 16), patch=2).ssm_blocks == ((8, 8), (8, 8))


def test_self_contradicting_configs_fail():
    base = PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match="causal_full.*attn_window must be None"):
        ModelConfig.from_dict({**base, "variant": "causal_full", "ssm_blocks": [], "attn_window": 9})
    with pytest.raises(ValueError, match="no_blockwise needs every SSM block"):
        ModelConfig.from_dict({**base, "variant": "no_blockwise"})
    with pytest.raises(ValueError, match="does not tile"):
        ModelConfig.from_dict({**base, "ssm_blocks": [[3, 3], [8, 8]]})
    with pytest.raises(ValueError, match="has no attention"):
        ModelConfig.from_dict({**base, "variant": "mamba_only"})
    with pytest.raises(ValueError, match="unknown variant"):
        make_config("tiny", "transformer")
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="continuous actions need action_dim"):
        make_config("tiny", action_kind="continuous")


def test_preset_parameter_counts():
    counts = {name: parameter_count(make_config(name)) for name in PRESETS}
    print("parameters per preset (lssvwm):", counts)
    assert counts["tiny"] < 200_000
    assert 1_000_000 < counts["small"] < 10_000_000
    assert 100_000_000 < counts["base"] < 250_000_000
    # Every variant of the tiny preset builds for real and runs.
    for variant in VARIANTS:
        model = WorldModel(make_config("tiny", variant))
        x = torch.randn(1, 2, 16, 8, 8)
        out = model(x, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long))
        assert out.denoised.shape == x.shape and out.reward.shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# Parallel == streaming
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_streaming_matches_parallel(variant, dtype, tol):
    cfg = tiny_config(variant)
    model = perturbed_model(cfg, dtype)
    B, T, P = 2, 8, 3
    x, sigma, actions = random_inputs(cfg, B, T, dtype)
    with torch.no_grad():
        parallel = model(x, sigma, actions)

        cache = model.allocate_cache(B)
        streamed = stack_outputs([model.step(x[:, t], sigma[:, t], actions[:, t], cache) for t in range(T)])
        assert cache.frames_seen == T

        cache = model.allocate_cache(B)
        prefix = model(x[:, :P], sigma[:, :P], actions[:, :P], cache=cache)
        rest = [model.step(x[:, t], sigma[:, t], actions[:, t], cache) for t in range(P, T)]
        prefilled = WorldModelOutput(
            *(torch.cat([getattr(prefix, f), getattr(stack_outputs(rest), f)], 1)
              for f in ("denoised", "reward", "termination_logit"))
        )
    assert_outputs_close(streamed, parallel, tol)
    assert_outputs_close(prefilled, parallel, tol)
    # Clean frames come back exactly (EDM with sigma = 0), in both paths.
    assert torch.equal(parallel.denoised[:, ::3], x[:, ::3])
    assert torch.equal(streamed.denoised[:, ::3], x[:, ::3])


def test_all_clean_inputs_and_continuous_actions_stream_exactly():
    cfg = tiny_config("lssvwm", action_kind="continuous", n_actions=0, action_dim=3)
    model = perturbed_model(cfg, torch.float64)
    B, T = 2, 7
    x, _, actions = random_inputs(cfg, B, T, torch.float64)
    sigma = torch.zeros(B, T, dtype=torch.float64)
    no_action = torch.zeros(B, T, dtype=torch.bool)
    no_action[:, 0] = True
    with torch.no_grad():
        parallel = model(x, sigma, actions, no_action=no_action)
        cache = model.allocate_cache(B)
        streamed = stack_outputs([model.step(x[:, t], sigma[:, t], actions[:, t], cache, no_action=no_action[:, t])
                                  for t in range(T)])
    assert_outputs_close(streamed, parallel, 1e-10)
    # no_action really replaces the action: changing a masked action changes nothing.
    other = actions.clone()
    other[:, 0] += 5
    with torch.no_grad():
        assert torch.equal(model(x, sigma, other, no_action=no_action).reward, parallel.reward)


def test_step_without_commit_leaves_the_cache_and_matches_committing():
    cfg = tiny_config("lssvwm")
    model = perturbed_model(cfg)
    B, T = 2, 5
    x, sigma, actions = random_inputs(cfg, B, T)
    with torch.no_grad():
        cache = model.allocate_cache(B)
        model(x[:, :4], torch.zeros(B, 4), actions[:, :4], cache=cache)
        before = cache.clone()
        probe = model.step(x[:, 4], sigma[:, 4] + 1, actions[:, 4], cache, commit=False)
        # Denoising again at the same input gives the same answer: nothing leaked into the cache.
        again = model.step(x[:, 4], sigma[:, 4] + 1, actions[:, 4], cache, commit=False)
        committed = model.step(x[:, 4], sigma[:, 4] + 1, actions[:, 4], before)
    assert cache.frames_seen == 4 and before.frames_seen == 5
    assert_outputs_close(probe, again, 0)
    assert_outputs_close(probe, committed, 1e-6)


def test_cache_select_forks_streams():
    cfg = tiny_config("lssvwm")
    model = perturbed_model(cfg)
    B, T = 3, 6
    x, sigma, actions = random_inputs(cfg, B, T)
    with torch.no_grad():
        cache = model.allocate_cache(B)
        model(x[:, :5], sigma[:, :5], actions[:, :5], cache=cache)
        ref = model.step(x[:, 5], sigma[:, 5], actions[:, 5], cache.clone())
        forked = cache.select([2, 2, 0])
        by_mask = cache.select(torch.tensor([True, False, True]))
        out = model.step(x[[2, 2, 0], 5], sigma[[2, 2, 0], 5], actions[[2, 2, 0], 5], forked)
        out_mask = model.step(x[[0, 2], 5], sigma[[0, 2], 5], actions[[0, 2], 5], by_mask)
    torch.testing.assert_close(out.denoised, ref.denoised[[2, 2, 0]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_mask.denoised, ref.denoised[[0, 2]], atol=1e-6, rtol=1e-6)
    with pytest.raises(IndexError):
        cache.select([3])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_assign_restarts_streams(variant):
    """Streams 2 and 0 of a running batch are overwritten by a fresh 1-frame prefill (shorter than
    the 3-frame window): each stream then continues as its own stream run in parallel."""
    cfg = tiny_config(variant)
    model = perturbed_model(cfg, torch.float64)
    B, P, K = 3, 5, 4
    x, sigma, actions = random_inputs(cfg, B, P + K, torch.float64)
    z, zsig, zact = random_inputs(cfg, 2, 1, torch.float64, seed=2)
    with torch.no_grad():
        cache = model.allocate_cache(B)
        model(x[:, :P], sigma[:, :P], actions[:, :P], cache=cache)
        fresh = model.allocate_cache(2)
        model(z, zsig, zact, cache=fresh)
        cache.assign([2, 0], fresh)
        streamed = stack_outputs([model.step(x[:, t], sigma[:, t], actions[:, t], cache) for t in range(P, P + K)])
        kept = model(x[1:2], sigma[1:2], actions[1:2])  # stream 1 never restarted
        restarted = model(torch.cat([z[[1, 0]], x[[0, 2], P:]], 1), torch.cat([zsig[[1, 0]], sigma[[0, 2], P:]], 1),
                          torch.cat([zact[[1, 0]], actions[[0, 2], P:]], 1))
    for f in ("denoised", "reward", "termination_logit"):
        torch.testing.assert_close(getattr(streamed, f)[1:2], getattr(kept, f)[:, P:], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(getattr(streamed, f)[[0, 2]], getattr(restarted, f)[:, 1:], atol=1e-10, rtol=1e-10)
    if variant != "causal_full":
        assert cache.nbytes() == model.allocate_cache(B, dtype=torch.float64).nbytes()  # no growth
    with pytest.raises(ValueError, match="distinct"):
        cache.assign([1, 1], fresh)
    with pytest.raises(ValueError, match="one each"):
        cache.assign([1], fresh)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_bytes_do_not_grow_except_causal_full(variant):
    cfg = tiny_config(variant)
    model = perturbed_model(cfg)
    B = 1
    x, sigma, actions = random_inputs(cfg, B, 12)
    cache = model.allocate_cache(B)
    sizes = []
    with torch.no_grad():
        for t in range(12):
            model.step(x[:, t], sigma[:, t], actions[:, t], cache)
            sizes.append(cache.nbytes())
    if variant == "causal_full":
        assert sizes[-1] == 12 * sizes[0]  # one frame of keys and values per layer per step
    else:
        assert len(set(sizes)) == 1 and sizes[0] == model.allocate_cache(B).nbytes()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    cfg = tiny_config("lssvwm")
    model = WorldModel(cfg)
    x, sigma, actions = random_inputs(cfg, 2, 3)
    with pytest.raises(ValueError, match=r"discrete actions must have shape \(2, 3\)"):
        model(x, sigma, actions[:, :2])
    with pytest.raises(ValueError, match="must be integers"):
        model(x, sigma, actions.float())
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\]"):
        model(x, sigma, actions + 7)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\]"):
        model(x, sigma, actions - 9)
    with pytest.raises(ValueError, match="sigma must have shape"):
        model(x, sigma[:, 0], actions)
    with pytest.raises(ValueError, match="non-negative"):
        model(x, -sigma - 1, actions)
    with pytest.raises(ValueError, match=r"\(C, h, w\) = \(4, 4, 4\)"):
        model(x[:, :, :3], sigma, actions)
    cache = model.allocate_cache(1)
    with pytest.raises(ValueError, match="cache holds 1 streams"):
        model.step(x[:, 0], sigma[:, 0], actions[:, 0], cache)
    with pytest.raises(ValueError, match=r"discrete actions must have shape \(2,\)"):
        model.step(x[:, 0], sigma[:, 0], actions[:, :1], model.allocate_cache(2))

    cont = WorldModel(tiny_config("lssvwm", action_kind="continuous", n_actions=0, action_dim=3))
    with pytest.raises(ValueError, match=r"continuous actions must have shape \(2, 3, 3\)"):
        cont(x, sigma, torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="floating point"):
        cont(x, sigma, torch.ones(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        cont(x, sigma, torch.full((2, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="no_action must be a bool"):
        cont(x, sigma, torch.randn(2, 3, 3), no_action=torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# Initialisation and training signal
# ---------------------------------------------------------------------------------------------


def test_adaln_zero_init_is_skip_path():
    cfg = tiny_config("lssvwm")
    torch.manual_seed(0)
    model = WorldModel(cfg)
    for block in model.net.blocks:
        assert not block.modulation.linear.weight.any() and not block.modulation.linear.bias.any()
    assert not model.net.final.linear.weight.any() and not model.net.final.linear.bias.any()
    x, sigma, actions = random_inputs(cfg, 2, 5)
    with torch.no_grad():
        out = model(x, sigma, actions)
        c_skip = edm_coefficients(sigma[:, :, None, None, None], model.sigma_data)[0]
        torch.testing.assert_close(out.denoised, c_skip * x)
        # Every residual branch is the identity: a block returns its input unchanged.
        h = torch.randn(2, 5, cfg.tokens_per_frame, cfg.d_model)
        c = torch.randn(2, 5, cfg.d_model)
        assert torch.equal(model.net.blocks[0](h, c), h)


def test_gradients_reach_every_parameter():
    cfg = tiny_config("lssvwm")
    model = perturbed_model(cfg)
    B, T = 2, 8
    x, _, actions = random_inputs(cfg, B, T)
    rewards = torch.rand(B, T)
    terms = torch.zeros(B, T, dtype=torch.bool)
    terms[0, 3] = True
    # p_long_context = 1: every sample has a clean prefix, so the heads are in the loss.
    loss, stats = world_model_loss(model, x, actions.clamp(max=5), rewards, terms,
                                   torch.Generator().manual_seed(0), ForcingConfig(p_long_context=1.0))
    loss.backward()
    assert stats["head_frames"] > 0 and math.isfinite(stats["loss"])
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _OracleHeads(torch.nn.Module):
    """Stands in for a model whose heads output given values, to check the loss's alignment."""

    def __init__(self, model: WorldModel, reward: torch.Tensor, logit: torch.Tensor):
        super().__init__()
        self.model, self.reward, self.logit = model, reward, logit
        self.cfg, self.net, self.sigma_data = model.cfg, model.net, model.sigma_data

    def forward(self, x, sigma, actions, cache=None, no_action=None):
        out = self.model(x, sigma, actions, no_action=no_action)
        return WorldModelOutput(out.denoised, self.reward, self.logit)


def test_loss_aligns_actions_rewards_and_terminations():
    cfg = tiny_config("lssvwm")
    actions = torch.tensor([[3, 1, 4, 1, 5, 2]])
    cond, no_action = shift_actions(actions, cfg)
    assert cond.tolist() == [[6, 3, 1, 4, 1, 5]] and no_action.tolist() == [[True] + [False] * 5]

    B, T = 1, 6
    x = torch.randn(B, T, C, *GRID)
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.5, 0.0, 7.0]])
    terms = torch.tensor([[False, False, True, False, False, True]])
    # Head at frame i must predict step i - 1: shift right; frame 0 gets garbage (never trained).
    reward = torch.cat([torch.full((B, 1), 99.0), rewards[:, :-1]], 1)
    logit = torch.cat([torch.full((B, 1), -99.0), (terms[:, :-1].float() * 2 - 1) * 50], 1)
    g = torch.Generator().manual_seed(0)
    forcing = ForcingConfig(p_long_context=1.0)
    _, stats = world_model_loss(_OracleHeads(WorldModel(cfg), reward, logit), x, actions, rewards, terms, g, forcing)
    assert stats["head_frames"] >= 3
    assert stats["reward"] == 0 and stats["termination"] < 1e-12
    # Unshifted predictions are wrong somewhere on the clean prefix.
    g = torch.Generator().manual_seed(0)
    _, bad = world_model_loss(_OracleHeads(WorldModel(cfg), rewards, logit), x, actions, rewards, terms, g, forcing)
    assert bad["reward"] > 0.01
    with pytest.raises(ValueError, match="p_long_context must be > 0"):
        world_model_loss(WorldModel(cfg), x, actions, rewards, terms, g, ForcingConfig(p_long_context=0.0))
    with pytest.raises(ValueError, match="terminations must be bool"):
        world_model_loss(WorldModel(cfg), x, actions, rewards, terms.float(), g)


def action_driven_clips(B: int, T: int, seed: int = 0):
    """Fixed latent clips on a 3-D subspace: frame t = coef_t . (3 fixed (C, h, w) patterns), and
    each action moves coef by its own step (action 0 stays). Reward 1 for action 5, no terminations.

    Loss ~1 is what a denoiser that knows only the marginal scale of iid data gets (EDM's weighting
    makes the target unit-variance); well below 1 needs the subspace and the dynamics.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, C, *GRID, generator=g)  # (3, C, h, w)
    moves = torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [-0.5, 0, 0], [0, 0.5, 0], [0, -0.5, 0], [0, 0, 0.5]])
    actions = torch.randint(0, 6, (B, T), generator=g)
    coef = [torch.randn(B, 3, generator=g)]
    for t in range(T - 1):
        coef.append(coef[-1] + moves[actions[:, t]])  # a_t leads to frame t + 1
    coef = torch.stack(coef, 1)  # (B, T, 3)
    latents = torch.einsum("btk,kchw->btchw", coef, patterns) / math.sqrt(3)  # (B, T, C, h, w)
    return latents, actions, (actions == 5).float(), torch.zeros(B, T, dtype=torch.bool)


def test_loss_falls_on_a_fixed_batch():
    """60 AdamW steps of the tiny model on 4 fixed clips: the loss (mean of 4 fixed noise draws)
    falls >= 3x (measured ~1.74 -> ~0.45, 3.9x)."""
    cfg = tiny_config("lssvwm")
    torch.manual_seed(0)
    model = WorldModel(cfg)
    batch = action_driven_clips(4, 6)

    def evaluate() -> float:
        with torch.no_grad():
            draws = [world_model_loss(model, *batch, torch.Generator().manual_seed(s))[1]["loss"] for s in range(4)]
        return sum(draws) / len(draws)

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        loss, _ = world_model_loss(model, *batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    print(f"fixed-batch loss {before:.3f} -> {after:.3f} ({before / after:.1f}x)")
    assert after < before / 3


# ---------------------------------------------------------------------------------------------
# `worldsim bench train` pieces (the sweep itself runs from the CLI)
# ---------------------------------------------------------------------------------------------


def test_bench_fit_slope_recovers_power_laws():
    from worldsim.bench.train import fit_slope

    windows = [16, 32, 64, 128]
    assert fit_slope(windows, [3 * w for w in windows]) == pytest.approx(1.0)
    assert fit_slope(windows, [0.5 * w**2 for w in windows]) == pytest.approx(2.0)
    assert fit_slope([16], [1.0]) is None


def test_bench_measure_point_and_table():
    from worldsim.bench.train import TrainBenchConfig, format_table, measure_point

    cfg = TrainBenchConfig(variants=("lssvwm", "causal_full"), windows=(4, 6), steps=1, device="cpu")
    points = [measure_point(vars(cfg), v, w) for w in cfg.windows for v in cfg.variants]
    for p in points:
        assert p["step_s"] > 0 and p["flops"] > 0 and p["tokens"] == p["window"] * 64 and p["mfu"] is None
    results = {"config": vars(cfg), "points": points, "fits": {"lssvwm": {"time_slope": 1.0, "memory_slope": 1.0},
               "causal_full": {"time_slope": 1.5, "memory_slope": None}}, "goal": "g", "goal_met": True}
    table = format_table(results)
    assert "lssvwm" in table and "causal_full" in table and "T^1.50" in table and "met" in table


# ---------------------------------------------------------------------------------------------
# The direct path to the previous clean frames (prev_frames)
# ---------------------------------------------------------------------------------------------


def stream_against_parallel(cfg: ModelConfig, B: int = 2, T: int = 7, P: int = 2):
    """A perturbed float64 model streams frames P..T-1 after a prefill of P clean frames: each
    frame, noisy at sigma 0.7, is denoised by `step` (commit=False) and by the parallel pass over
    the clean past (clean= for the direct path), which must agree; then the clean frame is
    committed. Returns (model, cache, x, the last parallel inputs, sigma, actions, denoised)."""
    model = perturbed_model(cfg, torch.float64)
    x, _, actions = random_inputs(cfg, B, T, torch.float64)
    noisy = x + 0.7 * torch.randn_like(x)
    zeros = torch.zeros(B, T, dtype=torch.float64)
    with torch.no_grad():
        cache = model.allocate_cache(B)
        model(x[:, :P], zeros[:, :P], actions[:, :P], cache=cache)  # prefill
        for t in range(P, T):
            inputs = torch.cat([x[:, :t], noisy[:, t : t + 1]], 1)
            sigma = torch.cat([zeros[:, :t], torch.full((B, 1), 0.7, dtype=torch.float64)], 1)
            parallel = model(inputs, sigma, actions[:, : t + 1], clean=x[:, : t + 1]).denoised[:, t]
            streamed = model.step(noisy[:, t], sigma[:, t], actions[:, t], cache, commit=False).denoised
            torch.testing.assert_close(streamed, parallel, atol=1e-10, rtol=1e-10)
            model.step(x[:, t], zeros[:, t], actions[:, t], cache)  # commit the clean frame
    return model, cache, x, inputs, sigma, actions, parallel


@pytest.mark.parametrize("variant", ["lssvwm", "causal_window", "mamba_only"])
def test_direct_path_trains_what_streaming_runs(variant):
    """Training passes the clean latents behind a noisy window; at inference the cache keeps the
    committed clean frames. Frame t denoised in parallel with a clean past (and clean=) equals the
    streamed step on a cache that committed the clean frames 0..t-1."""
    model, cache, x, inputs, sigma, actions, parallel = stream_against_parallel(tiny_config(variant, prev_frames=2))
    torch.testing.assert_close(cache.recent, x[:, -2:])
    with torch.no_grad():  # the path is used: other previous frames give another prediction
        other = model(inputs, sigma, actions, clean=torch.cat([x[:, :-2] + 1, x[:, -2:]], 1)).denoised[:, -1]
    assert not torch.allclose(other, parallel)


def test_direct_path_cache_forks_and_restarts_per_stream():
    cfg = tiny_config("lssvwm", prev_frames=2)
    model = perturbed_model(cfg, torch.float64)
    x, sigma, actions = random_inputs(cfg, 3, 6, torch.float64)
    z, zsig, zact = random_inputs(cfg, 1, 3, torch.float64, seed=2)
    with torch.no_grad():
        cache = model.allocate_cache(3)
        model(x[:, :5], sigma[:, :5], actions[:, :5], cache=cache)
        forked = cache.select([2, 0])
        torch.testing.assert_close(forked.recent, cache.recent[[2, 0]])
        assert torch.equal(cache.clone().recent, cache.recent)
        fresh = model.allocate_cache(1)
        model(z, zsig, zact, cache=fresh)
        cache.assign([1], fresh)
        torch.testing.assert_close(cache.recent[1], z[0, -2:])
        restarted = model.step(x[1:2, 5], sigma[1:2, 5], actions[1:2, 5], cache.select([1])).denoised
        alone = model(torch.cat([z, x[1:2, 5:6]], 1), torch.cat([zsig, sigma[1:2, 5:6]], 1),
                      torch.cat([zact, actions[1:2, 5:6]], 1)).denoised[:, -1]
    torch.testing.assert_close(restarted, alone, atol=1e-10, rtol=1e-10)
    assert cache.nbytes() == model.allocate_cache(3, dtype=torch.float64).nbytes()


def test_direct_path_starts_as_the_model_without_it():
    """prev_in is zero-initialised: a model warm-started from weights without the path computes
    what they computed, and the path still gets a gradient (it can learn)."""
    torch.manual_seed(0)
    base = perturbed_model(tiny_config("lssvwm"))
    with_path = WorldModel(tiny_config("lssvwm", prev_frames=2))
    missing = with_path.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["precond.net.prev_in.bias", "precond.net.prev_in.weight"]
    x, sigma, actions = random_inputs(base.cfg, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(with_path(x, sigma, actions, clean=x + 1).denoised, base(x, sigma, actions).denoised)
    rewards, terms = torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool)
    loss, _ = world_model_loss(with_path, x, actions.clamp_max(with_path.cfg.n_actions - 1), rewards, terms,
                               generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert with_path.net.prev_in.weight.grad.abs().sum() > 0


def test_prev_frames_must_not_be_negative():
    with pytest.raises(ValueError, match="prev_frames"):
        tiny_config("lssvwm", prev_frames=-1)


# ---------------------------------------------------------------------------------------------
# The local head (a conv net at latent resolution on the token output)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,prev_frames", [("lssvwm", 2), ("lssvwm", 0), ("causal_window", 2)])
def test_local_head_streams_what_the_parallel_pass_computes(variant, prev_frames):
    """The head's share of the previous frames is computed once per frame (FrameStep); every
    denoiser call equals the parallel pass over a clean past."""
    cfg = tiny_config(variant, prev_frames=prev_frames, local_head=8)
    model, _, x, inputs, sigma, actions, parallel = stream_against_parallel(cfg, T=6)
    with torch.no_grad():  # the head is used: without it the prediction changes
        model.net.local_head.conv_out.weight.zero_()
        model.net.local_head.conv_out.bias.zero_()
        without = model(inputs, sigma, actions, clean=x).denoised[:, -1]
    assert not torch.allclose(without, parallel)


def test_local_head_starts_as_the_model_without_it():
    """conv_out is zero-initialised: a warm start from weights without the head (copy_weights
    accepts the new field) computes what they computed, and the head still gets a gradient."""
    from worldsim.train.weights import copy_weights

    torch.manual_seed(0)
    base = perturbed_model(tiny_config("lssvwm", prev_frames=2))
    with_head = WorldModel(tiny_config("lssvwm", prev_frames=2, local_head=8))
    report = copy_weights(with_head, base)
    assert report["new"] and all(name.startswith("precond.net.local_head.") for name in report["new"])
    x, sigma, actions = random_inputs(base.cfg, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(with_head(x, sigma, actions).denoised, base(x, sigma, actions).denoised)
    rewards, terms = torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool)
    loss, _ = world_model_loss(with_head, x, actions.clamp_max(with_head.cfg.n_actions - 1), rewards, terms,
                               generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert with_head.net.local_head.conv_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="local_head"):
        tiny_config("lssvwm", local_head=-1)


# ---------------------------------------------------------------------------------------------
# One frame, several calls (FrameStep)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_frame_step_shares_one_frame_across_denoiser_calls(variant):
    """begin_frame's denoise calls read the cache without changing it and equal `step` with
    commit=False; its commit equals `step` and the parallel pass; a committed FrameStep refuses."""
    cfg = tiny_config(variant, prev_frames=2)
    model = perturbed_model(cfg, torch.float64)
    B, T, P = 2, 7, 3
    x, sigma, actions = random_inputs(cfg, B, T, torch.float64)
    noisy = x + torch.randn_like(x)
    with torch.no_grad():
        parallel = model(x, sigma, actions)
        cache = model.allocate_cache(B)
        model(x[:, :P], sigma[:, :P], actions[:, :P], cache=cache)
        for t in range(P, T):
            frame = model.begin_frame(cache, actions[:, t])
            for level in (5.0, 0.7):
                level = torch.full((B,), level, dtype=torch.float64)
                denoised = frame.denoise(noisy[:, t], level)
                torch.testing.assert_close(denoised, model.step(noisy[:, t], level, actions[:, t], cache,
                                                                commit=False).denoised, rtol=0, atol=1e-12)
            assert cache.frames_seen == t
            out = frame.commit(x[:, t], sigma[:, t])
            assert_outputs_close(out, WorldModelOutput(*(getattr(parallel, f)[:, t] for f in
                                                         ("denoised", "reward", "termination_logit"))), 1e-10)
            assert cache.frames_seen == t + 1
            with pytest.raises(RuntimeError, match="committed"):
                frame.denoise(noisy[:, t], sigma[:, t])
    with pytest.raises(ValueError, match=r"discrete actions must have shape \(2,\)"):
        model.begin_frame(cache, actions[:1, 0])


def test_bundled_model_streams_what_the_parallel_pass_computes(monkeypatch):
    """The shipped model, float32: the one-frame path (FrameStep) against the parallel pass over the
    context plus the noisy frame, at the dream sampler's noise levels: equal to float rounding."""
    from worldsim.bundled import PACKAGE_BUNDLE_DIR, is_bundle, load_bundled

    monkeypatch.delenv("WORLDSIM_BUNDLE_DIR", raising=False)
    if not is_bundle(PACKAGE_BUNDLE_DIR):
        pytest.skip(f"no bundled model in this checkout ({PACKAGE_BUNDLE_DIR})")
    bundle = load_bundled()
    model, codec = bundle.model, bundle.codec
    frames = torch.as_tensor(bundle.clips.frames[:2])  # (2, T, 64, 64, 3)
    acts = torch.as_tensor(bundle.clips.actions[:2])  # (2, T - 1)
    B, T = frames.shape[:2]
    n = model.cfg.n_actions
    with torch.no_grad():
        latents = codec.encode(frames)  # (B, T, C, h, w)
        cond = torch.cat([torch.full((B, 1), n), acts], dim=1)  # frame 0 has no action
        cache = model.allocate_cache(B)
        model(latents[:, :-1], torch.zeros(B, T - 1), cond[:, :-1], cache=cache)
        frame = model.begin_frame(cache, cond[:, -1])
        g = torch.Generator().manual_seed(0)
        for level in (20.0, 3.0, 0.5, 0.1):
            noisy = latents[:, -1] + level * torch.randn(latents[:, -1].shape, generator=g)
            sigma = torch.zeros(B, T)
            sigma[:, -1] = level
            parallel = model(torch.cat([latents[:, :-1], noisy[:, None]], 1), sigma, cond).denoised[:, -1]
            torch.testing.assert_close(frame.denoise(noisy, sigma[:, -1]), parallel, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_training_forward_traces_as_one_graph():
    # The GPU job compiles the model: any graph break (a value check reading a tensor, a log line)
    # splits the compiled step. Dynamo's tracing alone, no code generation: a few seconds on a CPU.
    torch.manual_seed(0)
    model = WorldModel(make_config("tiny", latent_channels=4, n_actions=6, prev_frames=2))
    B, T = 2, 8
    latents = torch.randn(B, T, 4, *model.cfg.latent_grid)
    actions = torch.randint(0, 6, (B, T))
    sigma = torch.rand(B, T)
    no_action = torch.zeros(B, T, dtype=torch.bool)
    no_action[:, 0] = True  # as world_model_loss shifts the actions: frame 0 has none
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(latents, sigma, actions, no_action=no_action, clean=latents)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


def _recorded_loss_setup(B: int, T: int):
    """A tiny model with a direct path whose forward calls are recorded as (x_noisy, sigma, kwargs),
    and a window of data for `world_model_loss`: (model, calls, (x, actions, rewards, terms))."""
    torch.manual_seed(0)
    model = WorldModel(make_config("tiny", latent_channels=C, latent_grid=GRID, n_actions=6, prev_frames=2))
    calls = []
    model.forward = lambda x_noisy, sigma, actions, **kw: calls.append((x_noisy, sigma, kw)) or (
        WorldModel.forward(model, x_noisy, sigma, actions, **kw))
    x = torch.randn(B, T, C, *GRID)
    actions, rewards, terms = torch.randint(0, 6, (B, T)), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)
    return model, calls, (x, actions, rewards, terms)


def _plain_and_changed_calls(B: int, T: int, **forcing):
    """(the data's clean latents, the plain recipe's main-pass call, ForcingConfig(**forcing)'s):
    each call as (x_noisy, sigma, kwargs), on the same data and seed."""
    model, calls, data = _recorded_loss_setup(B, T)
    for cfg in (ForcingConfig(), ForcingConfig(**forcing)):
        world_model_loss(model, *data, torch.Generator().manual_seed(1), cfg)
    return data[0], calls[0], calls[-1]


def test_direct_noise_reaches_only_the_direct_path():
    # Direct-path augmentation: the model's `clean` input is noised per frame with std in
    # [0, direct_noise]; x_noisy, sigma and the loss target stay those of the plain recipe.
    from worldsim.model.loss import _augment_direct

    x, (x_plain, sigma_plain, kw_plain), (x_aug, sigma_aug, kw_aug) = _plain_and_changed_calls(3, 6, direct_noise=0.5)
    clean_plain, clean_aug = kw_plain["clean"], kw_aug["clean"]
    assert torch.equal(clean_plain, x)  # off: the data itself, no random numbers drawn
    torch.testing.assert_close(sigma_aug, sigma_plain)
    torch.testing.assert_close(x_aug, x_plain)  # the augmentation's draws come after the denoiser's
    per_frame_std = (clean_aug - x).flatten(2).std(-1)  # (B, T)
    assert (per_frame_std > 0).all() and (per_frame_std < 0.5 * 1.3).all() and per_frame_std.std() > 0.02

    many = _augment_direct(torch.zeros(400, 8, 4, 16, 16), 1.0, torch.Generator().manual_seed(0))
    stds = many.flatten(2).std(-1)
    assert abs(stds.mean().item() - 0.5) < 0.03 and stds.max() < 1.1  # std ~ U(0, 1): mean 0.5


def test_noised_direct_shows_frames_after_the_prefix_noised_on_the_direct_path():
    # Memory training: in a window with a clean prefix, the direct path of every noised frame is
    # its noised latent at the denoiser's input scale (c_in); the prefix stays clean there, and the
    # backbone's input, the noise levels and the target are those of the plain recipe.
    def calls_with(p_long_context: float):
        model, calls, data = _recorded_loss_setup(6, 8)
        for noised_direct in (0.0, 1.0):
            forcing = ForcingConfig(p_long_context=p_long_context, noised_direct=noised_direct)
            world_model_loss(model, *data, torch.Generator().manual_seed(1), forcing)
        return data[0], calls[0], calls[-1]

    x, (x_plain, sigma_plain, kw_plain), (x_mem, sigma_mem, kw_mem) = calls_with(1.0)
    torch.testing.assert_close(sigma_mem, sigma_plain)
    torch.testing.assert_close(x_mem, x_plain)
    prefix, noised = sigma_mem == 0, sigma_mem > 0
    assert prefix[:, 0].all() and noised.any()
    clean = kw_mem["clean"]
    assert torch.equal(clean[prefix], x[prefix])
    c_in = 1.0 / (sigma_mem.square() + 1.0).sqrt()  # sigma_data 1
    torch.testing.assert_close(clean[noised], (x_mem * c_in[:, :, None, None, None])[noised])
    assert torch.equal(kw_plain["clean"], x)
    # Windows without a prefix are left alone, whatever the probability.
    _, _, (x_np, sigma_np, kw_np) = calls_with(1e-9)
    assert (sigma_np > 0).all() and torch.equal(kw_np["clean"], x)


def test_own_context_shows_later_frames_the_models_own_predictions():
    # own_context: two no-grad passes predict every frame as the two-call sampler would; in a
    # chosen window the direct path and the clean prefix are those predictions (the first
    # OWN_REAL_FRAMES stay real), while the noised frames and the loss target stay the real ones.
    from worldsim.model.loss import OWN_EXTRAPOLATION, OWN_REAL_FRAMES, OWN_SIGMAS, own_predictions

    B, T = 4, 8
    model, calls, (x, actions, rewards, terms) = _recorded_loss_setup(B, T)
    for p in model.parameters():  # a non-zero direct path, so predictions depend on it
        p.data.add_(0.02 * torch.randn_like(p))
    forcing = ForcingConfig(own_context=1.0, p_long_context=1.0)  # every window: own context and a prefix
    loss, _ = world_model_loss(model, x, actions, rewards, terms, torch.Generator().manual_seed(1), forcing)
    assert torch.isfinite(loss)
    (x1, s1, c1), (x2, s2, c2), (x_main, s_main, c_main) = [(xn, sg, kw["clean"]) for xn, sg, kw in calls]
    assert torch.equal(c1, x) and torch.equal(c2, x)  # the predictions come from real context
    assert torch.equal(s1, torch.full((B, T), OWN_SIGMAS[0])) and torch.equal(s2, torch.full((B, T), OWN_SIGMAS[1]))
    assert torch.equal(c_main[:, :OWN_REAL_FRAMES], x[:, :OWN_REAL_FRAMES])
    assert not torch.allclose(c_main[:, OWN_REAL_FRAMES:], x[:, OWN_REAL_FRAMES:], atol=1e-3)
    prefix, noised = s_main == 0, s_main > 0
    assert prefix.any() and noised.any()
    torch.testing.assert_close(x_main[prefix], c_main[prefix])  # the backbone's clean prefix: predictions
    # noised frames: the real frame plus noise (the loss target is real), not the prediction plus noise
    world_model_loss(model, x, actions, rewards, terms, torch.Generator().manual_seed(1), ForcingConfig(p_long_context=1.0))
    torch.testing.assert_close(x_main[noised], calls[-1][0][noised])

    # The prediction itself: the second estimate extrapolated from the first.
    model.forward = WorldModel.forward.__get__(model)
    cond, no_action = shift_actions(actions, model.cfg)
    pred = own_predictions(model, x, cond, no_action, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    first = model(x + OWN_SIGMAS[0] * torch.randn(x.shape, generator=g), torch.full((B, T), OWN_SIGMAS[0]), cond,
                  no_action=no_action, clean=x).denoised
    second = model(first + OWN_SIGMAS[1] * torch.randn(x.shape, generator=g), torch.full((B, T), OWN_SIGMAS[1]), cond,
                   no_action=no_action, clean=x).denoised
    torch.testing.assert_close(pred, second + OWN_EXTRAPOLATION * (second - first))
    assert not pred.requires_grad
