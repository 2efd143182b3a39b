"""hyperdiff.seeds: every derived seed, with the values hyperdiff derived before the module.

The expected numbers were computed from the formulas as they stood in the modules that used
them (sampler, online loop, in-memory minibatches, data-parallel ranks, Gumbel noise, discrete
samples, model calls, long-training segments) before they moved here; the golden runs check
the same values end to end.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hyperdiff import seeds

SRC = Path(__file__).resolve().parents[1] / "src" / "hyperdiff"


@pytest.mark.parametrize("value, expected", [
    (lambda: seeds.minibatch_seed(12, 5, 4, 3), 12000059),
    (lambda: seeds.window_seed(7, 9), 7000030),
    (lambda: seeds.epoch_seed(11, 2), 1100035),
    (lambda: seeds.rank_seed(2**31 - 3, 2), 14737571),
    (lambda: seeds.rank_seed(17, 0), 17),
    (lambda: seeds.gumbel_seed(4, "act"), 2955542096),
    (lambda: seeds.choice_seed(13, 6, 2, "width"), 2363788898),
    (lambda: seeds.call_seed(3 * 2**61, 8, 2), 2305843009213765225),
    (lambda: seeds.segment_seed(42, 3), 23799),
    (lambda: seeds.report_seeds(3), (1_000_000, 1_000_001, 1_000_002)),
    (lambda: seeds.task_seed(3, 5, "sinusoid"), 2670532845),  # new with the few-shot tasks
    (lambda: seeds.meta_task(3, 5, 2, 1), (11, 3626053443)),  # new with the meta plan
])
def test_seed_values_are_the_ones_used_before(value, expected):
    assert value() == expected


def test_seeds_fit_their_generators():
    assert 0 <= seeds.minibatch_seed(2**40, 2**30, 7, 6) < 2**31
    assert 0 <= seeds.rank_seed(2**31 - 1, 2**20) < 2**31
    assert 0 <= seeds.call_seed(2**70, 2**40, 5) < 2**62
    assert 0 <= seeds.choice_seed(2**70, 3, 1, "x") < 2**62
    assert 0 <= seeds.task_seed(2**70, 2**40, "episode:train") < 2**62


MULTIPLIERS = {1_000_003, 100_003, 7_919, 104_729, 7_368_787, 1_000_000}


def test_no_seed_formula_outside_the_seeds_module():
    """The multipliers of the seed formulas appear in hyperdiff/seeds.py only."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "seeds.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is int \
                    and node.value in MULTIPLIERS:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value}")
    assert found == []
