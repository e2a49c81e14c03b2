"""Runs that repeat: the same recipe gives the same losses fresh, rerun with --force into the same
directory (its random-init base then already exists), or after other code drew from the global RNGs."""

from __future__ import annotations

from test_train import Quiet, demo_recipe, losses


def test_a_rerun_into_the_same_directory_repeats_the_losses_exactly(tmp_path):
    import random

    import torch

    from qlora_kit.train.loop import train

    fresh, other = tmp_path / "run", tmp_path / "other"
    train(demo_recipe(fresh, max_steps=4), Quiet())
    first = losses(fresh)
    torch.rand(1000), random.random()  # whatever ran before must not matter
    train(demo_recipe(fresh, max_steps=4), Quiet(), force=True)
    assert (fresh / "random-init-base").is_dir()
    assert losses(fresh) == first
    train(demo_recipe(other, max_steps=4), Quiet())
    assert losses(other) == first
    assert len(first) == 4
