"""QA as a new user: mistakes in an own task are refused at build time with one clear line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyperdiff as hd
from hyperdiff.app.experiment import format_table
from hyperdiff.errors import describe


def _spec(metrics=None, data=None, batch_size=None):
    torch.manual_seed(0)
    net = hd.functional(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                            torch.nn.Linear(4, 2)).double())

    def loss(params, h, batch, ctx):
        x, y = batch
        return F.cross_entropy(net(params, x, ctx), y)

    x = torch.randn(60, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    return net, hd.task("qa", model=net, train_loss=loss, val_loss=loss,
                        hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                        data=(x, y) if data is None else data, steps=2,
                        batch_size=batch_size, metrics=metrics(net) if metrics else None)


def test_batchnorm_metrics_without_ctx_is_refused_at_build():
    def metrics(net):
        return lambda p, h, b: {"loss": float(F.cross_entropy(net(p, b[0]), b[1]))}

    _, spec = _spec(metrics)
    with pytest.raises(hd.HyperdiffError, match=r"task qa: metrics failed .*ctx"):
        spec.build()


@pytest.mark.parametrize("returned, match", [
    ({"acc": 1.0}, r"metrics must return a 'loss' entry.*\['acc'\]"),
    (3.0, r"metrics must return a non-empty dict"),
    ({"loss": "x"}, r"entry 'loss' is 'x'"),
])
def test_metrics_results_are_validated(returned, match):
    _, spec = _spec(lambda net: lambda p, h, b, ctx: returned)
    with pytest.raises(hd.HyperdiffError, match=match):
        spec.build()


def test_good_metrics_with_extra_keys_build_and_show_in_the_report():
    def metrics(net):
        def fn(p, h, b, ctx):
            logits = net(p, b[0], ctx)
            return {"loss": float(F.cross_entropy(logits, b[1])),
                    "f1ish": float((logits.argmax(-1) == b[1]).double().mean())}
        return fn

    _, spec = _spec(metrics)
    task = spec.build()
    report = task.evaluate(seeds=(0,))
    assert set(report["test"]) == {"loss", "f1ish"}
    side = {"hparams": {"lr": 0.1}, "summary": {}, "metrics": report}
    table = format_table({"task": "qa", "steps": 1, "time_s": 0.0, "stop_reason": "x",
                          "best_step": 0, "criterion": "selection_loss", "sizes": {},
                          "report_seeds": [0], "run_dir": "r", "initial": side, "tuned": side})
    row = next(line for line in table.splitlines() if line.startswith("test f1ish (held out)"))
    assert row.split()[-2:] == [f"{report['test']['f1ish']:.4f}"] * 2
    assert "test loss (held out)" in table


def test_dict_data_with_batch_size_says_what_to_do_in_one_short_line():
    x = torch.randn(60, 3, dtype=torch.float64)
    _, spec = _spec(data={"x": x, "y": (x[:, 0] > 0).long()}, batch_size=8)
    with pytest.raises(hd.HyperdiffError) as info:
        spec.build()
    message = str(info.value)
    assert "a dict of tensors {'x': tensor of shape (" in message
    assert "batch_size=None" in message and len(message) < 400


def test_a_dtype_mismatch_names_the_parameter_and_data_dtypes():
    x = torch.randn(60, 3, dtype=torch.float32)  # model is float64
    _, spec = _spec(data=(x, (x[:, 0] > 0).long()))
    with pytest.raises(hd.HyperdiffError, match=r"\(float64 on cpu\); .*validation batch: "
                       r"batch\[0\] \(\d+, 3\) float32"):
        spec.build()


def test_describe_summarizes_containers_of_tensors():
    assert describe((torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))) == (
        "a tuple of tensors (tensor of shape (10, 2) (float32), tensor of shape (10,) (int64))")
    assert describe({"a": torch.zeros(7)}) == "a dict of tensors {'a': tensor of shape (7,) (float32)}"
    assert describe([1, 2]) == "[1, 2]"
