"""The pure optimizers against torch.optim, bit for bit, in float32 and float64."""

import pytest
import torch

import hyperdiff as hd

CASES = {
    "sgd": (lambda: hd.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_wd": (
        lambda: hd.sgd(0.1, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    ),
    "heavy_ball": (
        lambda: hd.sgd(0.05, 0.9, dampening=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    ),
    "nesterov": (
        lambda: hd.sgd(0.05, 0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "adam": (
        lambda: hd.adam(0.01, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    ),
    "adam_betas": (
        lambda: hd.adam(0.003, betas=(0.8, 0.95), eps=1e-6),
        lambda p: torch.optim.Adam(p, lr=0.003, betas=(0.8, 0.95), eps=1e-6),
    ),
    "adamw": (lambda: hd.adamw(0.01), lambda p: torch.optim.AdamW(p, lr=0.01)),
}


def _objective(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(a @ w) ** 2).sum() + 0.1 * (w**4).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_optim_bitwise(name, dtype):
    make, make_torch = CASES[name]
    w0 = torch.randn(6, 3, dtype=dtype)
    w0[0] = 0.0  # a row with exactly zero gradient (Adam's sqrt(0) case)
    a = torch.randn(9, 6, dtype=dtype)
    a[:, 0] = 0.0
    ref = w0.clone().requires_grad_()
    torch_opt = make_torch([ref])
    opt = make()
    params = {"w": w0.clone()}
    state = opt.init(params)
    hp = hd.HyperParameters(unused=hd.scalar(1.0))
    view = hp.view(hp.raw)
    for step in range(60):
        torch_opt.zero_grad()
        _objective(ref, a).backward()
        torch_opt.step()
        leaf = params["w"].clone().requires_grad_()
        (g,) = torch.autograd.grad(_objective(leaf, a), leaf)
        params, state = opt.update({"w": g}, state, params, view, step)
    assert params["w"].dtype == dtype
    assert torch.equal(params["w"], ref.detach()), (params["w"] - ref).abs().max()


def test_hyperparameter_coefficients_match_constants():
    """Coefficients given as hyperparameters, schedules and per-tensor values."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    hp = hd.HyperParameters(
        lr=hd.per_step(5, [0.1, 0.09, 0.08, 0.07, 0.06]),
        mom=hd.scalar(0.9, (0.0, 1.0)),
        wd=hd.per_tensor(params, {"w": 0.01, "b": 0.0001}),
    )
    view = hp.view(hp.raw)
    opt = hd.sgd("lr", "mom", weight_decay="wd")
    refs = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = torch.optim.SGD(
        [{"params": [refs["w"]], "weight_decay": 0.01}, {"params": [refs["b"]], "weight_decay": 1e-4}],
        lr=0.1, momentum=0.9,
    )
    state = opt.init(params)
    for step in range(5):
        for group in torch_opt.param_groups:
            group["lr"] = 0.1 - 0.01 * step
        torch_opt.zero_grad()
        (refs["w"].sum(0) * refs["b"]).pow(2).sum().backward()
        torch_opt.step()
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = (leaves["w"].sum(0) * leaves["b"]).pow(2).sum()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        params, state = opt.update(grads, state, params, view, step)
    for k in params:
        torch.testing.assert_close(params[k], refs[k].detach(), rtol=1e-13, atol=1e-15)


def test_optimizer_errors():
    with pytest.raises(hd.HyperdiffError, match="nesterov=True needs a non-zero momentum"):
        hd.sgd(0.1, nesterov=True)
    with pytest.raises(hd.HyperdiffError, match="betas must be a pair"):
        hd.adam(0.1, betas=0.9)
    with pytest.raises(hd.HyperdiffError, match="lr must be a number >= 0, a hyperparameter name"):
        hd.sgd([0.1])


def test_adam_decoupled_checked_before_it_names_the_caller():
    # a non-bool decoupled used to be read as truthy first, so the lr error said "adamw:"
    with pytest.raises(hd.HyperdiffError, match=r"^adam: decoupled must be True or False"):
        hd.adam(-1.0, decoupled="yes")  # type: ignore[arg-type]
    with pytest.raises(hd.HyperdiffError, match=r"^adamw: betas\[0\] must be"):
        hd.adamw(0.1, betas=(1.5, 0.999))
