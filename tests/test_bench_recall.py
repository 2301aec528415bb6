"""`worldsim bench recall`: the synthetic recall task's data, its premise (the cue is out of a
sliding window's sight, not out of a state-space model's), and a short run end to end."""

import pytest
import torch

from worldsim.bench.recall import (RECALL, WAIT, RecallBenchConfig, build_model, estimate_frame, format_table, make_patterns,
                                   make_sequences, run)


def test_sequences_show_the_cue_first_and_last_with_blanks_between():
    cfg = RecallBenchConfig(frames=10, patterns=5)
    patterns = make_patterns(cfg)
    assert patterns.shape == (5, cfg.channels, cfg.grid, cfg.grid)
    latents, actions, cue = make_sequences(patterns, 64, cfg.frames, torch.Generator().manual_seed(0))
    assert latents.shape == (64, 10, cfg.channels, cfg.grid, cfg.grid) and set(cue.tolist()) == set(range(5))
    assert torch.equal(latents[:, 0], patterns[cue]) and torch.equal(latents[:, -1], patterns[cue])
    assert not latents[:, 1:-1].any()
    # Data-aligned: the action taken at frame T - 2 leads to the recall frame.
    assert (actions[:, :-2] == WAIT).all() and (actions[:, -2] == RECALL).all()


@pytest.mark.parametrize("variant, sees_the_cue", [("causal_window", False), ("lssvwm", True), ("mamba_only", True)])
def test_only_a_model_with_a_state_can_see_the_cue_at_the_recall(variant, sees_the_cue):
    """Two sequences that differ only in the cue: a sliding window's estimate of the recall frame is
    the same for both (frame 0 lies outside its window), a state-space model's differs."""
    cfg = RecallBenchConfig(frames=8, attn_window=3)
    torch.manual_seed(0)
    model = build_model(cfg, variant).eval()
    for p in model.parameters():  # random weights everywhere, the zero-initialised output layers too
        torch.nn.init.normal_(p, std=0.2)
    patterns = make_patterns(cfg)
    latents, actions, _ = make_sequences(patterns, 2, cfg.frames, torch.Generator().manual_seed(0))
    latents[0, 0], latents[1, 0] = patterns[0], patterns[1]
    # The same noise for both streams: only the cue differs between them.
    out = torch.stack([estimate_frame(model, latents[i : i + 1], actions[i : i + 1], cfg.frames - 1,
                                      torch.Generator().manual_seed(1))[0] for i in range(2)])
    differs = (out[0] - out[1]).abs().max().item()
    assert (differs > 1e-4) == sees_the_cue, differs


def test_a_short_run_reports_every_variant():
    cfg = RecallBenchConfig(variants=("lssvwm", "causal_window"), frames=6, attn_window=2, d_model=32, steps=3,
                            batch_size=4, eval_sequences=8)
    results = run(cfg)
    for variant in cfg.variants:
        r = results["variants"][variant]
        assert 0 <= r["recall_accuracy"] <= 1 and r["recall_mse"] > 0 and len(r["losses"]) == 2
    table = format_table(results)
    assert "causal_window" in table and "chance" in table
    with pytest.raises(ValueError, match="cue out of sight"):
        RecallBenchConfig(frames=6, attn_window=5).validate()


def test_the_memory_floor_reaches_the_training_noise():
    cfg = RecallBenchConfig(variants=("mamba_only",), frames=6, attn_window=2, d_model=32, steps=2, batch_size=4,
                            eval_sequences=8)
    plain = run(cfg)["variants"]["mamba_only"]["losses"]
    cfg.min_sigma_after_prefix = 20.0
    results = run(cfg)
    floored = results["variants"]["mamba_only"]["losses"]
    assert "after the clean prefix >= sigma 20" in format_table(results)
    assert plain[0] != floored[0]  # same weights and data, other noise levels after the prefix
    with pytest.raises(ValueError, match="min_sigma_after_prefix"):
        RecallBenchConfig(min_sigma_after_prefix=-1.0).validate()
