import pytest
import torch

from carbseg.engine.schedule import poly_lr, set_poly_lr
from carbseg.engine.train_data import BatchKey, IterationKeys, SampleOrder


def test_poly_lr_hand_computed():
    # (0.01 - 1e-4) * (1 - 50/100) ** 0.9 + 1e-4 = 0.0099 * 0.535887 + 1e-4
    assert poly_lr(0.01, 0, 100, 0.9, 1e-4) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100, 0.9, 1e-4) == pytest.approx(0.0099 * 0.535887 + 1e-4, abs=1e-8)
    assert poly_lr(0.01, 100, 100, 0.9, 1e-4) == pytest.approx(1e-4)
    assert poly_lr(0.01, 150, 100, 0.9, 1e-4) == pytest.approx(1e-4)  # clamped past the end


def test_set_poly_lr_keeps_group_ratios():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.1}], lr=0.01)
    lr = set_poly_lr(opt, 50, 100, 1.0, 0.0)
    assert lr == pytest.approx(0.005)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05)
    # A fresh optimizer restored from the state dict continues from the same base rates.
    opt2 = torch.optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 0.5}], lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    set_poly_lr(opt2, 75, 100, 1.0, 0.0)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([0.0025, 0.025])


def test_poly_lr_defaults_are_deeplabs_power_and_a_zero_floor():
    # power 0.9, min_lr 0: 0.01 * 0.5 ** 0.9 halfway, 0 at the end.
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9, rel=1e-12)
    assert poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 0, 1) == 0.01  # a one-iteration run is valid


def test_poly_lr_refuses_a_run_without_iterations():
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"max_iters must be positive, got {bad}"):
            poly_lr(0.01, 0, bad)


def test_set_poly_lr_scales_min_lr_by_each_groups_factor():
    # Head at 10x the backbone's rate: its floor is 10x min_lr too, so the ratio holds to the last step.
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.1}], lr=0.01)
    # (0.01 - 1e-4) * 0.5 + 1e-4 = 0.00505 and (0.1 - 1e-3) * 0.5 + 1e-3 = 0.0505 at power 1.
    assert set_poly_lr(opt, 50, 100, 1.0, 1e-4) == pytest.approx(0.00505, rel=1e-12)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0505, rel=1e-12)
    set_poly_lr(opt, 100, 100, 1.0, 1e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3], rel=1e-12)


def test_set_poly_lr_with_a_zero_first_rate_keeps_the_plain_floor():
    # A first group at lr 0 gives no ratio (no division by 0): the other groups decay to min_lr itself.
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 0.1}], lr=0.0)
    set_poly_lr(opt, 100, 100, 1.0, 1e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-4, rel=1e-12)


def test_sample_order_one_process_is_a_permutation_per_epoch():
    order = SampleOrder(7, seed=3)
    epoch0 = [order.index(p) for p in range(7)]
    epoch1 = [order.index(p) for p in range(7, 14)]
    assert sorted(epoch0) == list(range(7)) and sorted(epoch1) == list(range(7))
    assert epoch0 != epoch1  # reshuffled every epoch
    assert epoch0 == [SampleOrder(7, seed=3).index(p) for p in range(7)]  # a pure function of (seed, position)
    assert order.epoch(6) == 0 and order.epoch(7) == 1


def test_sample_order_shards_by_rank():
    ranks = [SampleOrder(5, seed=1, rank=r, world=2) for r in range(2)]
    assert ranks[0].per_rank == 3
    shard0 = [ranks[0].index(p) for p in range(3)]
    shard1 = [ranks[1].index(p) for p in range(3)]
    # Together the shards cover every image; one is repeated to pad 5 images to 2 x 3.
    assert set(shard0) | set(shard1) == set(range(5))
    assert len(shard0 + shard1) == 6


def test_iteration_keys_resume_where_they_stopped():
    keys = list(IterationKeys(2, 4, batch_size=2, grad_accum=2))
    assert len(keys) == 4 == len(IterationKeys(2, 4, 2, 2))
    assert keys[0] == [BatchKey(2, 0, 0), BatchKey(2, 0, 1)]
    assert keys[-1] == [BatchKey(3, 1, 0), BatchKey(3, 1, 1)]
