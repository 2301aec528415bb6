"""How long SSM heads keep their state: the recorded retention against the closed form."""

import math

import pytest
import torch

from worldsim.evaluation.state_retention import SSMRetention, describe, frame_log_retention, long_memory_heads
from worldsim.model.blockwise_ssm import BlockwiseMamba2
from worldsim.model.config import make_config
from worldsim.model.world_model import WorldModel


def constant_dt_layer(dt: float, A: list[float], block=(2, 2)) -> BlockwiseMamba2:
    """A layer whose every head takes step dt on every token (the dt rows of in_proj zeroed)."""
    torch.manual_seed(0)
    layer = BlockwiseMamba2(32, (4, 4), block, d_state=8, head_dim=8, expand=1)
    assert layer.n_heads == len(A)
    with torch.no_grad():
        layer.in_proj.weight[-layer.n_heads:] = 0
        layer.dt_bias.fill_(math.log(math.expm1(dt)))  # softplus^-1(dt)
        layer.A_log.copy_(torch.tensor(A).log())
    return layer


def test_retention_per_frame_is_exp_of_A_times_the_blocks_summed_steps():
    A = [0.5, 1.0, 2.0, 8.0]
    for block in ((2, 2), (4, 4)):
        layer = constant_dt_layer(0.01, A, block)
        x = torch.randn(2, 5, 16, 32)
        log_r = frame_log_retention(layer, x)  # (rows, T, h)
        tokens = block[0] * block[1]
        assert log_r.shape == (2 * 16 // tokens, 5, 4)
        want = torch.tensor([-a * tokens * 0.01 for a in A]).expand_as(log_r)
        torch.testing.assert_close(log_r, want, rtol=1e-5, atol=1e-7)


def test_the_recorder_reads_a_world_models_forward_and_lets_go_after():
    cfg = make_config("tiny", "lssvwm", latent_channels=4, latent_grid=(16, 16), patch=2)
    torch.manual_seed(0)
    model = WorldModel(cfg).eval()
    x = torch.randn(1, 6, 4, 16, 16)
    actions = torch.randint(0, cfg.n_actions, (1, 6))
    with torch.no_grad(), SSMRetention(model) as retention:
        model(x, torch.zeros(1, 6), actions)
    summary = retention.summary()
    assert [layer["layer"] for layer in summary] == list(range(cfg.n_layers))
    for layer, block in zip(summary, model.net.blocks):
        # Frames to 1/e is the median log retention per frame, inverted; every head forgets a little.
        assert layer["block"] == list(block.ssm.block)
        assert all(m < 0 and f == pytest.approx(-1 / m) for m, f in zip(layer["median_log_retention"], layer["frames_to_1e"]))
    n_records = len(retention.records[0])
    with torch.no_grad():
        model(x, torch.zeros(1, 6), actions)  # outside `with`: nothing more recorded
    assert len(retention.records[0]) == n_records
    with pytest.raises(RuntimeError, match="no forward"):
        SSMRetention(model).summary()
    causal = WorldModel(make_config("tiny", "causal_window", latent_channels=4, latent_grid=(16, 16), patch=2))
    with SSMRetention(causal) as none:
        pass
    assert none.summary() == [] and describe([], 8) == "no SSM layers"


def test_heads_that_outlast_the_window_are_counted_and_named():
    summary = [{"layer": 0, "block": [2, 2], "frames_to_1e": [0.5, 40.0]},
               {"layer": 3, "block": [4, 4], "frames_to_1e": [None, 2.0]}]
    assert long_memory_heads(summary, 9) == [(3, 0, math.inf), (0, 1, 40.0)]
    text = describe(summary, 9)
    assert text.startswith("2 of 4 SSM heads") and "layer 3 head 0 (all)" in text and "layer 0 head 1 (40)" in text
    assert describe(summary, 100).startswith("1 of 4")
