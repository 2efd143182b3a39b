import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.engine.models import StepContext


def test_batchnorm_running_statistics_match_torch():
    module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3)).double()
    net = hd.functional(module)
    reference = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3)).double()
    reference.load_state_dict(module.state_dict())
    reference.train()
    buffers = dict(net.buffers)
    for step in range(3):
        x = torch.randn(16, 4, dtype=torch.float64)
        ctx = StepContext(step=step, seed=0, train=True, buffers=buffers)
        out = net(net.params, x, ctx)
        torch.testing.assert_close(out, reference(x))
        buffers = {**buffers, **ctx.new_buffers}
    torch.testing.assert_close(buffers["1.running_mean"], reference[1].running_mean)
    torch.testing.assert_close(buffers["1.running_var"], reference[1].running_var)
    reference.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    eval_out = net(net.params, x, StepContext(step=-1, seed=0, train=False, buffers=buffers))
    torch.testing.assert_close(eval_out, reference(x))
    # the wrapped module itself was never mutated
    assert float(module[1].running_mean.abs().max()) == 0.0
    assert int(module[1].num_batches_tracked) == 0


def test_dropout_is_reproducible_from_seed_and_step():
    net = hd.functional(nn.Sequential(nn.Linear(3, 50), nn.Dropout(0.5)).double())
    x = torch.randn(4, 3, dtype=torch.float64)

    def run(seed, step):
        return net(net.params, x, StepContext(step=step, seed=seed, train=True))

    assert torch.equal(run(0, 1), run(0, 1))
    assert not torch.equal(run(0, 1), run(0, 2))
    assert not torch.equal(run(0, 1), run(1, 1))
    # global RNG untouched
    state = torch.get_rng_state()
    run(0, 1)
    assert torch.equal(state, torch.get_rng_state())


def test_errors():
    with pytest.raises(hd.HyperdiffError, match="must be called as net\\(params, x, ctx\\)"):
        net = hd.functional(nn.BatchNorm1d(3))
        net(net.params, torch.zeros(2, 3))
    with pytest.raises(hd.HyperdiffError, match="momentum=None"):
        hd.functional(nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(hd.HyperdiffError, match="must be a torch.nn.Module"):
        hd.functional(lambda x: x)
