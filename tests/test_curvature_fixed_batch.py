"""The curvature model's scale on a fixed batch (session 34).

``scale * vhat`` with ``scale`` the batch's rows ``B`` estimates the empirical Fisher's
diagonal where a minibatch gradient is mostly sampling noise. A fixed batch (every step the same
rows: a full batch) has none, so the default scale there is 1, checked against the recurrence
written out in test_online_curvature.py at scale 1; ``"rows"`` keeps the rows (the rule before,
which stored configs without the key read), and minibatches keep the rows. Also the sources'
``fixed_batch``, the config's written rule and its legacy reading, and the data-parallel scale.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
from test_online_curvature import make, mlp_train_loss, reference

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.engine.data.convert import as_source
from hyperdiff.engine.data.sources import FullBatch, Minibatches, Sequence
from hyperdiff.methods.curvature import batch_scale
from hyperdiff.tuner.distributed.data_parallel import _full_batch_scale

from conftest import sine_data

pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

ROWS = 24  # make()'s training rows


def test_which_sources_read_a_fixed_batch():
    x, y = sine_data(ROWS, 5, seed=1)
    assert FullBatch((x, y)).fixed_batch and as_source((x, y)).fixed_batch
    assert Sequence([(x, y)]).fixed_batch and not Sequence([(x, y), (x, y)]).fixed_batch
    assert Minibatches(x, y, batch_size=ROWS).fixed_batch
    assert not Minibatches(x, y, batch_size=ROWS - 1).fixed_batch
    assert not as_source(lambda step, seed: (x, y)).fixed_batch  # a function: cannot tell


def window_grads(prob, **options):
    """The curvature run's window hypergradients (4 windows of 3 steps at fixed values)."""
    tuner = hd.online.OnlineTuner(prob, window=3, method="curvature", lr=0.0, horizon=7,
                                  **options)
    return [r.grad for r in tuner.run().history]


def close_to(record_grad, expected):
    return all(abs(record_grad[n] - float(g)) <= 1e-10 * max(1.0, abs(float(g)))
               for n, g in expected.items())


@pytest.mark.parametrize("full", ["minibatches", "full batch"])
def test_a_fixed_batch_takes_scale_one_by_the_written_out_recurrence(full):
    prob = make(mlp_train_loss, 12, 0.7, batch_size=ROWS)  # every row at every step
    if full == "full batch":
        prob = replace(prob, train_data=FullBatch(sine_data(ROWS, 5, seed=1)))
    default, rows = window_grads(prob), window_grads(prob, curvature_scale="rows")
    for j, (ours, old) in enumerate(zip(default, rows, strict=True)):
        one, _ = reference(prob, 3 * (j + 1), 7, 1.0)
        many, _ = reference(prob, 3 * (j + 1), 7, float(ROWS))
        assert close_to(ours, one) and close_to(old, many), j
    assert default[-1] != rows[-1]  # the two rules differ on this problem
    assert window_grads(prob, curvature_scale="auto") == default
    assert window_grads(prob, curvature_scale=1.0) == default


def test_minibatches_keep_the_batch_rows():
    prob = make(mlp_train_loss, 12, 0.7, batch_size=6)
    default = window_grads(prob)
    assert default == window_grads(prob, curvature_scale="rows")
    assert default == window_grads(prob, curvature_scale=6.0)
    assert close_to(default[-1], reference(prob, 12, 7, 6.0)[0])


def test_offline_and_the_truncated_head_take_the_same_rule():
    prob = make(mlp_train_loss, 8, 0.7, batch_size=ROWS)
    raw = prob.hparams.raw
    for method in (hd.methods.curvature, partial(hd.methods.truncated, fraction=0.5,
                                                  head="curvature")):
        auto, one, rows = (method(**scale)(prob, raw) for scale in (
            {}, {"curvature_scale": 1.0}, {"curvature_scale": "rows"}))
        assert all(torch.equal(auto.grad[n], one.grad[n]) for n in auto.grad)
        assert not all(torch.equal(auto.grad[n], rows.grad[n]) for n in auto.grad)


def test_batch_scale_reads_the_rule():
    fixed = make(mlp_train_loss, 4, batch_size=ROWS)
    mini = make(mlp_train_loss, 4, batch_size=6)
    assert [batch_scale(fixed, 0, s) for s in (None, "auto", "rows", 0.0, 3.0)] == [
        1.0, 1.0, float(ROWS), 0.0, 3.0]
    assert [batch_scale(mini, 2, s) for s in (None, "rows")] == [6.0, 6.0]


def test_data_parallel_fixes_the_whole_batch_scale():
    fixed = make(mlp_train_loss, 4, batch_size=ROWS)
    mini = make(mlp_train_loss, 4, batch_size=6)
    assert _full_batch_scale(hd.methods.curvature(), fixed, 0).options["curvature_scale"] == 1.0
    assert _full_batch_scale(hd.methods.curvature(), mini, 0).options["curvature_scale"] == 6.0
    assert _full_batch_scale(hd.methods.curvature(curvature_scale="rows"), fixed,
                             0).options["curvature_scale"] == float(ROWS)
    kept = hd.methods.curvature(curvature_scale=2.0)
    assert _full_batch_scale(kept, fixed, 0) is kept
    reverse = hd.reverse()
    assert _full_batch_scale(reverse, fixed, 0) is reverse


@pytest.mark.parametrize("bad", ["fisher", "", -1.0, float("nan")])
def test_a_bad_scale_is_refused(bad):
    with pytest.raises(hd.HyperdiffError, match=r"curvature: curvature_scale must be"):
        hd.methods.curvature(curvature_scale=bad)


def test_the_config_writes_the_rule_and_an_older_run_reads_rows(tmp_path):
    online = load_config(overrides=["task.name=logistic_cancer", "outer.mode=online"])
    assert online.method.name == "curvature"
    assert online.method.options == {"curvature_scale": "auto"}
    assert load_config(overrides=["method.name=reverse"]).method.options == {}
    head = load_config(overrides=["method.name=truncated", "method.fraction=0.5",
                                  "method.head=curvature"])
    assert head.method.options["curvature_scale"] == "auto"
    assert "curvature_scale" not in load_config(overrides=[
        "method.name=truncated", "method.fraction=0.5"]).method.options
    given = load_config(overrides=["outer.mode=online", "method.curvature_scale=3.0"])
    assert given.method.options == {"curvature_scale": 3.0}
    # a run directory's config.toml: every key of its time; one from before has no scale
    text = online.to_toml()
    assert 'curvature_scale = "auto"' in text
    now, before = tmp_path / "now.toml", tmp_path / "before.toml"
    now.write_text(text)
    before.write_text(text.replace('curvature_scale = "auto"\n', ""))
    assert load_config(now, stored=True) == online
    old = load_config(before, stored=True)
    assert old.method.options == {"curvature_scale": "rows"}
    assert old == replace(online, method=replace(online.method,
                                                  options={"curvature_scale": "rows"}))
