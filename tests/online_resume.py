"""One check shared by the online tests: a run saved after some windows and resumed in a fresh
tuner ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

from collections.abc import Callable

import torch

import hyperdiff as hd
from hyperdiff.app.rundir import RunDir


def assert_resumes_bit_for_bit(make_tuner: Callable[[], hd.online.OnlineTuner], tmp_path,
                               windows: int = 2) -> tuple[hd.online.OnlineTuner, hd.online.OnlineResult]:
    """Run ``make_tuner()`` whole; run another for ``windows`` windows, save it to a run
    directory's checkpoint, load it into a third and finish; assert equal parameters, raw
    values and records. Returns the resumed tuner and the whole run's result."""
    whole = make_tuner().run()
    first = make_tuner()
    for _ in range(windows):
        first.step()
    rundir = RunDir(tmp_path)
    rundir.path.mkdir(exist_ok=True)
    rundir.save_checkpoint(first.state_dict())
    second = make_tuner()
    second.load_state_dict(rundir.load_checkpoint())
    resumed = second.run()
    assert resumed.steps == whole.steps
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k])
    for n in whole.final_raw:
        assert torch.equal(resumed.final_raw[n], whole.final_raw[n])
    assert [r.without_timing() for r in resumed.history] == [
        r.without_timing() for r in whole.history]
    return second, whole
