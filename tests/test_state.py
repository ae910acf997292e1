"""preserved_state / rng_state / replayed_rng: everything a block may disturb is put back exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from optdiag.curvature.state import RngState, preserved_state, replayed_rng, rng_state


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2))


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_buffers_are_restored_bitwise_as_the_same_objects():
    net = _net().train()
    bn = net[1]
    objects = {name: buf for name, buf in net.named_buffers()}
    values = {name: buf.clone() for name, buf in net.named_buffers()}
    with preserved_state(net):
        net(torch.randn(8, 3))  # train-mode forward updates the running statistics
        assert not torch.equal(bn.running_mean, values["1.running_mean"])
        assert int(bn.num_batches_tracked) == 1
    for name, buf in net.named_buffers():
        assert buf is objects[name]
        assert torch.equal(buf, values[name])


def test_reassigned_buffer_slot_gets_its_original_object_back():
    net = _net()
    original = net[1].running_var
    with preserved_state(net):
        net[1].running_var = torch.full((4,), 7.0)
    assert net[1].running_var is original
    assert torch.equal(original, torch.ones(4))


def test_unchanged_buffer_is_not_written():
    net = _net()
    version = net[1].running_mean._version
    with preserved_state(net):
        pass
    assert net[1].running_mean._version == version


def test_sign_of_zero_counts_as_a_change():
    net = _net()
    with preserved_state(net):
        net[1].running_mean.mul_(-1.0)  # 0.0 -> -0.0: equal as numbers, different bits
    assert not torch.signbit(net[1].running_mean).any()


def test_modes_are_restored_per_module():
    net = _net().train()
    net[3].eval()  # a mixed configuration that net.train() would not reproduce
    with preserved_state(net):
        net.eval()
        net[1].train()
    assert net.training and net[1].training and not net[3].training
    assert [m.training for m in net] == [True, True, True, False, True]


def test_grads_are_set_aside_and_restored_as_the_same_objects():
    net = _net()
    first, last = net[0].weight, net[4].bias
    existing = torch.randn_like(first)
    first.grad = existing
    expected = existing.clone()
    with preserved_state(net):
        assert first.grad is None and last.grad is None  # nothing inside can add to the training gradients
        net(torch.randn(8, 3)).sum().backward()
        assert last.grad is not None
    assert first.grad is existing
    assert torch.equal(first.grad, expected)
    assert last.grad is None  # None stays None


def test_rng_states_are_restored():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = _draws()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with preserved_state(None):
        _draws()
    assert _draws() == expected


def test_state_is_restored_when_the_block_raises():
    net = _net().train()
    before = net[1].running_mean.clone()
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with pytest.raises(KeyError):
        with preserved_state(net):
            net(torch.randn(8, 3))
            net.eval()
            torch.rand(5)
            raise KeyError("boom")
    assert torch.equal(net[1].running_mean, before)
    assert net.training
    assert torch.equal(torch.rand(2), expected)


def test_switched_off_kinds_are_left_alone():
    net = _net().train()
    torch.manual_seed(2)
    with preserved_state(net, rng=False, buffers=False, modes=False, grads=False):
        net(torch.randn(8, 3))
        net.eval()
    assert int(net[1].num_batches_tracked) == 1
    assert not net.training


def test_rng_state_snapshot_restores_all_generators():
    state = rng_state()
    assert isinstance(state, RngState)
    first = _draws()
    state.restore()
    assert _draws() == first


def test_replayed_rng_repeats_draws_without_moving_the_outer_stream():
    snapshot = rng_state()
    torch.manual_seed(5)
    expected_outer = torch.rand(4)
    torch.manual_seed(5)
    with replayed_rng(snapshot):
        a = torch.rand(3), np.random.rand()
    with replayed_rng(snapshot):
        b = torch.rand(3), np.random.rand()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(torch.rand(4), expected_outer)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        with preserved_state("model"):
            pass
    with pytest.raises(TypeError, match="grads"):
        with preserved_state(_net(), grads=1):
            pass
    with pytest.raises(TypeError, match="RngState"):
        with replayed_rng(torch.get_rng_state()):
            pass


def test_changed_since_names_the_generators_that_moved():
    before = rng_state()
    assert rng_state().changed_since(before) == ()
    np.random.rand()
    random.random()
    assert rng_state().changed_since(before) == ("numpy", "python")
    torch.rand(1)
    assert rng_state().changed_since(before) == ("torch", "numpy", "python")


def test_partial_snapshot_replays_only_its_generators():
    torch_only = rng_state(["torch"])
    assert torch_only.numpy is None and torch_only.python is None
    np.random.seed(8)
    expected_numpy = np.random.rand()
    np.random.seed(8)
    with replayed_rng(torch_only):
        np.random.rand()  # not captured, so not put back
    assert np.random.rand() != expected_numpy
    with pytest.raises(ValueError, match="unknown generators"):
        rng_state(["cupy"])
