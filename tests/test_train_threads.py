"""The CPU thread count a run measures when train.num_threads is 0: the decision from measured rates
(injected, never timed here), and throwaway passes that leave the run as it was."""

from __future__ import annotations

import torch

from helpers import tiny_config
from vitkit.models.vit import VisionTransformer
from vitkit.train import distributed
from vitkit.train.experiment import TrainConfig
from vitkit.train.learner import Learner, choose_thread_count, thread_candidates
from vitkit.train.objectives import get_objective
from vitkit.train.precision import setup_arithmetic
from vitkit.train.task import Task


def test_candidates_are_the_default_half_and_one():
    assert thread_candidates(16) == [16, 8, 1]
    assert thread_candidates(2) == [2, 1]
    assert thread_candidates(1) == [1]


def test_a_busy_machine_falls_back_to_fewer_threads():
    # A fine-tune on a busy machine: every core at 0.56 steps/s, one thread at 6.5.
    threads, line = choose_thread_count({16: 0.56, 8: 2.1, 1: 6.5}, default=16)
    assert threads == 1
    assert line == (
        "cpu threads: 1, faster than the default 16 (measured passes/s by thread count: 16: 0.56, 8: 2.10, 1: 6.50)"
    )


def test_the_default_stays_unless_clearly_slower():
    assert choose_thread_count({16: 10.0, 8: 12.0, 1: 3.0}, default=16)[0] == 8
    # Within the noise of a few passes: the default.
    threads, line = choose_thread_count({16: 10.0, 8: 10.5, 1: 3.0}, default=16)
    assert threads == 16 and line.startswith("cpu threads: 16, the default (")
    # Equal rates: the default, never a count picked by the order of the table.
    assert choose_thread_count({4: 5.0, 2: 5.0, 1: 5.0}, default=4)[0] == 4


def test_throwaway_passes_leave_the_run_as_it_was():
    torch.manual_seed(0)
    # Dropout draws from the RNG; the BatchNorm of the early-convolution stem updates its statistics.
    model = VisionTransformer(tiny_config(num_classes=3, dropout=0.1, stem="conv"))
    supervised = get_objective("supervised")
    task = Task(
        model=model,
        build_optimizer=lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
        objective=lambda model, batch, step, micro: supervised(model, batch),
        metadata={},
        write_outputs=lambda weights, ema, out_dir: {},
    )
    env = distributed.setup("cpu")
    arithmetic = setup_arithmetic("fp32", 1, env.device)
    learner = Learner(task, TrainConfig(num_threads=1), env, arithmetic)
    learner.wrapped.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the default of a two-core machine: two counts to measure
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batch = (torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    rng = torch.get_rng_state()
    try:
        rates = learner.measure_threads(task.objective, batch, arithmetic, num_passes=1)
        assert set(rates) == {2, 1} and min(rates.values()) > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(parameter.grad is None for parameter in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
