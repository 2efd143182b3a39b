import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd
from hyperdiff.engine.data import as_source


def test_minibatches_are_seeded_and_cover_each_epoch():
    x = torch.arange(10.0)[:, None]
    source = hd.minibatches(x, batch_size=5)
    epoch0 = torch.cat([source.batch(t, seed=1) for t in range(2)]).flatten()
    assert sorted(epoch0.tolist()) == list(range(10))
    assert torch.equal(source.batch(0, seed=1), hd.minibatches(x, batch_size=5).batch(0, seed=1))
    assert not torch.equal(source.batch(0, seed=1), source.batch(2, seed=1))  # new epoch order


def test_dataloader_is_replayed_identically():
    ds = TensorDataset(torch.arange(20.0)[:, None])
    source = as_source(DataLoader(ds, batch_size=4, shuffle=True))
    first = [source.batch(t, seed=3)[0] for t in range(7)]
    again = as_source(DataLoader(ds, batch_size=4, shuffle=True))
    assert all(torch.equal(a, again.batch(t, seed=3)[0]) for t, a in enumerate(first))
    assert not all(torch.equal(a, source.batch(t, seed=4)[0]) for t, a in enumerate(first))


def test_list_cycles_and_callable():
    batches = [torch.tensor(i) for i in range(3)]
    source = as_source(batches)
    assert [int(source.batch(t, 0)) for t in range(5)] == [0, 1, 2, 0, 1]
    assert int(as_source(lambda step: torch.tensor(step * 2)).batch(4, 0)) == 8


def test_one_shot_iterator_runs_out_with_a_clear_error():
    source = as_source(iter([torch.tensor(1), torch.tensor(2)]))
    assert int(source.batch(1, 0)) == 2
    with pytest.raises(hd.HyperdiffError, match="ran out after 2 batches, but steps=5"):
        source.check(5, 0)


def test_minibatch_errors():
    with pytest.raises(hd.HyperdiffError, match=r"batch_size must be an int in \[1, 4\]"):
        hd.minibatches(torch.zeros(4, 2), batch_size=8)
    with pytest.raises(hd.HyperdiffError, match="share their first dimension"):
        hd.minibatches(torch.zeros(4, 2), torch.zeros(3), batch_size=2)
    for bad in ([1, 2, 3], "y", torch.tensor(1.0)):  # not a tensor with rows: no raw traceback
        with pytest.raises(hd.HyperdiffError, match="minibatches: tensors must be torch tensors"):
            hd.minibatches(torch.zeros(4, 2), bad, batch_size=2)


def test_batch_rows_looks_past_a_nested_part_without_rows():
    from hyperdiff.engine.data.evaluation import batch_rows, sample_weights

    x = torch.zeros(5, 2)
    assert batch_rows(({"count": torch.tensor(3)}, x)) == 5  # the first tensor with rows
    assert batch_rows({"meta": [7, "id"], "x": {"pixels": x}}) == 5
    assert batch_rows(x) == 5 and batch_rows(torch.tensor(1.0)) == 1 and batch_rows([1]) == 1
    assert sample_weights([({"k": torch.tensor(0)}, x), ({"k": torch.tensor(0)}, x[:3])]) == [
        5 / 8, 3 / 8]
