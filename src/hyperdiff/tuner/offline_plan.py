"""The offline plan: every outer step retrains ``[0, T)`` for every fold x sample.

Outer step ``s`` at raw values ``u_s`` (:class:`~hyperdiff.tuner.sampler.Sampler`)::

    for each problem j (one, or one per cross-validation fold) and sample i < samples:
        train T inner steps from theta_0 (or, with warm_start, from that slot's last theta)
        with minibatch seed seed(s, i): theta_T(lam_s); L_ji = L_val(theta_T), g_ji = dL_ji/du
    g_s = mean_ji g_ji   (spread: std_ji g_ji; REINFORCE estimates for sampled choices)

``explore=k`` makes steps 1..k a global phase (:mod:`hyperdiff.tuner.global_phase`): k
quasi-random points in a box of +-``explore_decades`` decades around the start, then the
gradient phase from the best step so far with a fresh outer optimizer. Not with
``warm_start``: each step would train on from the last one's theta_T, so the points would be
a chain of trainings ranked by how far each trained, not independent trials; a warm-start
run has no phase and refuses an ``explore`` other than 0 or the default 8
(:func:`check_warm_explore`). With ``explore_when="broken"`` the phase runs only after a
broken start: step 0 failed, its training ended no better than the untrained model (its
selection loss, else its validation loss, ``>=`` the untrained model's on the same batches),
or its hypergradient is chaotic
(:func:`~hyperdiff.tuner.global_phase.broken_start`): where the hypergradient of a diverging
or chaotic training does not point the way. With ``explore_when="weak"`` (the default) also
after a weak start: its training removed less than a fifth of the untrained model's loss (a
learning rate far too small), or its hypergradient is steep against what the training
removed (:func:`~hyperdiff.tuner.global_phase.weak_start`): where the gradient phase would
spend its budget travelling.

``revert=m`` goes back when the ranking loss (selection, else validation) rose at each of
the last ``m`` successful gradient-phase steps after the best one and since the last return,
``L_best < L_1 < ... < L_m``: the values become the best step's, the outer optimizer starts
afresh and the outer learning rate is cut by the guard's ``shrink`` (as a failed step cuts
it). A hypergradient that keeps pointing past the best point (a long, chaotic training,
docs/driver.md) then searches near it with shorter steps; a run that crosses a plateau or a
noisy stretch (the loss not rising at every step) goes on.

``confirm_chaotic=c`` (2 by default) trains a step ``c`` more times on other minibatch seeds
when its selection loss would make it the new best and its hypergradient is chaotic (norm above
30x its loss: a training near the edge of stability, whose one loss is a lucky or unlucky
draw), and ranks it by the mean (:mod:`hyperdiff.tuner.confirm`); ``confirm=c`` does so for
every would-be best.

``common_seed=True`` trains slot ``i`` of every step on the minibatch seed of step 0's
(common random numbers): the steps' selection losses then differ by their values only, not
by the minibatch order and dropout of each step's own seed, and the hypergradient is the
exact gradient of one fixed function of the values. A black-box search scores its trials the
same way (``hyperdiff.app.search``: one seed for every trial).

``samples="auto"`` draws 2 samples, then one more at a time until the signal-to-noise ratio
of the per-sample hypergradients reaches 1 or ``max_samples`` (:mod:`hyperdiff.tuner.snr`).
The plan's state is the warm slots (each slot's last ``(params, buffers)``) and the trainings
count; the loop (:class:`~hyperdiff.tuner.driver.HyperOptimizer`) ranks its steps, stops by
its :class:`~hyperdiff.tuner.stopping.Stopping` rules and returns the best step's values.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data import FullBatch
from hyperdiff.errors import HyperdiffError, NonFiniteError, fail, nonnegative_int, positive_int
from hyperdiff.logs import get_logger
from hyperdiff.methods.base import Method
from hyperdiff.methods.registry import make_method, methods_where
from hyperdiff.tuner.confirm import chaotic, chaotic_skipped, confirmed
from hyperdiff.tuner.discrete_outer import outer_hook
from hyperdiff.tuner.distributed.agree import (
    WORLD_KEY,
    agreed_elapsed,
    agreed_mean,
    check_ranks_agree,
    torch_world,
)
from hyperdiff.tuner.distributed.data_parallel import (
    DataParallelMethod,
    loop_group,
    world_checked,
)
from hyperdiff.tuner.distributed.group import current_group
from hyperdiff.tuner.distributed.spread import spreader_for
from hyperdiff.tuner.driver_checks import (
    auto_samples,
    check_driver_state,
    check_selection,
    check_warm_start,
    refuse_online_state,
)
from hyperdiff.tuner.global_phase import (
    broken_start,
    check_explore,
    explore_points,
    explored_names,
    restarts,
    start_order,
    weak_start,
)
from hyperdiff.tuner.guard import start_values, untrained_losses
from hyperdiff.tuner.history import History, OptimizeResult, StepRecord, natural_values
from hyperdiff.tuner.outer_steps import DEFAULT_OFFLINE, SignStep, offline_optimizers
from hyperdiff.tuner.plan import Outcome, bind_once
from hyperdiff.tuner.sampler import Sampler, estimate_fields, plain_fields
from hyperdiff.tuner.snr import more_samples_advice
from hyperdiff.tuner.stopping import (
    CHAOS_RATIO,
    ranking_loss,
    ranking_name,
    settled_since,
    travelling,
)
from hyperdiff.wording import option

_LOG = get_logger("driver")
EXPLORE_WHEN = ("always", "weak", "broken")
"""When the global phase runs: after every start, after a broken or weak one, or after a
broken one only."""


class OfflinePlan:
    """Retrain every outer step: ``samples`` minibatch seeds x the problems (folds).

    Args:
        samples: trainings per step and problem with different minibatch seeds; their
            hypergradients are averaged, their spread and signal-to-noise ratio recorded.
            ``"auto"``: 2 samples, then one more at a time until the ratio reaches 1.
        max_samples: the most samples per step with ``samples="auto"``.
        warm_start: start each step's training from the slot's previous theta_T.
        explore: quasi-random points tried at steps 1..explore before the gradient phase
            (0: none; :mod:`hyperdiff.tuner.global_phase`); by default 8, after a broken
            or weak start only; none with ``warm_start`` (module doc).
        explore_decades: half-width of their box around the start, in decades.
        explore_when: ``"always"``; ``"weak"``: after a broken or weak start; ``"broken"``:
            after a broken start only (module doc).
        confirm: more trainings (other minibatch seeds, no hypergradient) of a step whose
            selection loss beats the best so far, which is then ranked by the mean
            (:mod:`hyperdiff.tuner.confirm`; 0: none).
        confirm_chaotic: as many confirmations of a would-be best whose hypergradient is
            chaotic (module doc; 0: none; skipped where
            :func:`~hyperdiff.tuner.confirm.chaotic_skipped` says why).
        common_seed: every step's slots train on step 0's minibatch seeds (module doc).
        revert: return to the best step's values, with a fresh outer optimizer and the outer
            learning rate cut, after the ranking loss rose at this many steps in a row after
            the best one (module doc; 0: never).
    """

    caller = "HyperOptimizer"
    flat_leaf = False  # one leaf per name (clip_grad_norm_ over the leaves)
    optimizer_key = "optimizer"
    ranks = True
    reads_chaos = True  # ranks a calm step above a chaotic one (Stopping.chaos_ratio)
    zero_lr = False  # a zero outer rate would retrain the same values every step
    optimizers = tuple(offline_optimizers())  # torch.optim's and tuner/outer_steps.py's
    default_optimizer = DEFAULT_OFFLINE  # measured across tasks (docs/driver.md)

    def __init__(self, samples: int | str = 1, max_samples: int = 16, warm_start: bool = False,
                 explore: int = 8, explore_decades: float = 2.0, explore_when: str = "weak",
                 confirm: int = 0, revert: int = 0, common_seed: bool = False,
                 confirm_chaotic: int = 2):
        self.auto = auto_samples(samples, max_samples)
        self.samples = self.auto.maximum if self.auto else positive_int(
            "HyperOptimizer", "samples", samples)  # the stride of seeds and warm slots
        if not isinstance(warm_start, bool):
            raise fail("OfflinePlan", "warm_start", "True or False", warm_start)
        self.warm_start = warm_start
        self.explore, self.explore_decades = check_explore("HyperOptimizer", explore,
                                                           explore_decades)
        if explore_when not in EXPLORE_WHEN:
            raise fail("HyperOptimizer", "explore_when", f"one of {list(EXPLORE_WHEN)}",
                       explore_when)
        self.explore_when = explore_when
        check_warm_explore(self.warm_start, self.explore, self.explore_decades, explore_when)
        self.confirm = nonnegative_int("HyperOptimizer", "confirm", confirm)
        self.confirm_chaotic = nonnegative_int("HyperOptimizer", "confirm_chaotic",
                                               confirm_chaotic)
        self.chaotic_count = 0  # confirm_chaotic where the run allows it (set by bind)
        self._note = ""  # the record's note on the step's chaotic confirmation
        self.revert = nonnegative_int("HyperOptimizer", "revert", revert)
        if not isinstance(common_seed, bool):
            raise fail("HyperOptimizer", "common_seed", "True or False", common_seed)
        self.common_seed = common_seed
        self.reverted: list[int] = []  # the steps after which the run went back to the best
        self._evaluated: tuple[int, dict[str, Tensor], float | None] | None = None
        self._sampler: Sampler | None = None
        self._candidates: list[dict[str, Tensor]] = []  # the phase's points, if it runs
        self._points: list[dict[str, Tensor]] = []  # those it runs (set once it is decided)
        self._fresh: dict[str, Any] | None = None  # the outer optimizer's state before step 0
        self._travellers: list[str] = []  # the names stopping.travel watches (set by bind)
        self._agreed = False  # the ranks' problems were compared (at the first step trained)
        self._clock: tuple[tuple[int, int], float] | None = None  # the time judged, by step

    @property
    def sampler(self) -> Sampler:
        if self._sampler is None:
            raise HyperdiffError("OfflinePlan: the plan must be given to a HyperOptimizer "
                                 "before it trains (got an unbound plan)")
        return self._sampler

    def bind(self, loop: Any) -> None:
        """Check the method and the selection split; make the sampler and the discrete hook."""
        bind_once(self, loop)
        method = offline_method(loop, "HyperOptimizer")
        check_selection(loop.problems[0], loop.selection)
        check_warm_start(loop.problems, self.warm_start)
        if self.auto is None and self.samples == 1 and not all(
                isinstance(p.train_data, FullBatch) for p in loop.problems):
            _LOG.info("HyperOptimizer: %s with minibatches: the hypergradient's noise is "
                      "not measured; %s measures its signal-to-noise ratio and draws enough "
                      "samples", option("samples=1", "outer.samples = 1"),
                      more_samples_advice(False, 1))
        loop.discrete = outer_hook(loop.hparams, seed=loop.seed, samples=self.samples,
                                   max_steps=loop.stopping.max_steps, folds=len(loop.problems))
        if self.auto is not None and loop.discrete is not None and loop.discrete.reinforce:
            got = option("samples='auto'", "outer.auto_samples = true")
            raise HyperdiffError(
                f"HyperOptimizer: {option('samples', 'outer.auto_samples')} must be "
                f"{option('a fixed number', 'false')} with REINFORCE choices "
                f"({', '.join(map(repr, loop.discrete.reinforce))}): their score-function "
                "estimate pairs each step's drawn choices with its samples, which automatic "
                f"samples vary (got {got}); set "
                f"{option('samples=k', 'outer.auto_samples = false and outer.samples = k')} "
                "(k >= 2 for the leave-one-out baseline)")
        check_confirm(self.confirm, self.warm_start, loop)
        check_extend(loop)
        self.problems = loop.problems
        self._start = loop.hparams.raw
        self._candidates = [] if self.warm_start else explore_points(
            loop.hparams, self._start, self.explore, self.explore_decades, loop.seed)
        self._travellers = explored_names(loop.hparams)  # the values early stopping waits for
        self._points = self._candidates if self.explore_when == "always" else []
        self._sampler = Sampler(loop.problems, method, samples=self.samples, auto=self.auto,
                                seed=loop.seed, selection=loop.selection,
                                warm_start=self.warm_start, discrete=loop.discrete,
                                spreader=spreader_for(method, loop.process_group),
                                common=self.common_seed)
        skipped = chaotic_skipped(loop.problems, warm_start=self.warm_start,
                                  discrete=loop.discrete is not None,
                                  data_parallel=self.data_parallel)
        if skipped and self.confirm_chaotic:
            _LOG.debug("HyperOptimizer: confirm_chaotic does not apply with %s", skipped)
        self.chaotic_count = 0 if skipped else self.confirm_chaotic

    @property
    def data_parallel(self) -> bool:
        """Whether the method shards every batch over the ranks (a plain training would not
        repeat its trainings)."""
        return bool(self.sampler.method.options.get("data_parallel"))

    @property
    def warm(self) -> list[Any]:
        """Each slot's last ``(params, buffers)`` with warm starts, else ``None``."""
        return self.sampler.warm

    def seed_for(self, step: int, sample: int) -> int:
        """Minibatch seed of ``sample`` at outer ``step``."""
        return self.sampler.seed_for(step, sample)

    # ------------------------------------------------------------------ one outer step
    def schedule_position(self, loop: Any, step: int) -> tuple[int, int]:
        """The gradient phase's cosine runs over the steps after the global phase."""
        first = self.gradient_start
        if step < first:
            return 0, loop.stopping.max_steps
        return step - first, max(loop.stopping.max_steps - first, 1)

    @property
    def start_raw(self) -> dict[str, Tensor]:
        """The raw values the loop started at (step 0's; the global phase's center)."""
        return self._start

    @property
    def gradient_start(self) -> int:
        """The first step of the gradient phase: 1 + the points of the global phase (0 before
        the plan is bound, and without explored hyperparameters)."""
        return 1 + len(self._points) if self._points else 0

    def gradient_start_of(self, state: dict[str, Any]) -> int:
        """:attr:`gradient_start` of the run that saved ``state`` (its ``explored``)."""
        if "explored" not in state:
            return self.gradient_start
        return 1 + len(self._candidates) if state["explored"] is True else 0

    def stop_reason(self, loop: Any) -> str | None:
        """The loop's stopping rules; early stopping counts the gradient phase's steps only
        (it gets its own ``patience`` steps to improve on the global phase's best), and with
        ``stopping.travel`` only those in which no explored value still travels; with
        ``stopping.extend`` the budget waits for a value that still travels."""
        since_best = min(loop.since_best, max(loop.step_index - self.gradient_start, 0))
        since_best = settled_since(loop.history, since_best, self.gradient_start, loop.hparams,
                                   self._travellers, loop.stopping.travel)
        return loop.stopping.reason(steps=loop.step_index, elapsed=self.elapsed(loop),
                                    since_best=since_best, has_selection=bool(loop.selection),
                                    travels=self._travels_at_budget(loop))

    def elapsed(self, loop: Any) -> float:
        """The loop's elapsed time as ``stopping.max_time_s`` judges it: under a process group
        rank 0's on every rank, taken once per step (the first time a rank asks: the loop's
        test, or a callback's ``optimizer.done``), so every rank stops after the same step
        even where rank 0 alone does slow work (a root-only logger)."""
        group = None if loop.stopping.max_time_s is None else loop_group(loop)
        if group is None:
            return float(loop.elapsed)
        key = (loop.step_index, len(loop.history))
        if self._clock is None or self._clock[0] != key:
            self._clock = (key, agreed_elapsed(group, f"the time budget at {self.where(loop)}",
                                               loop.elapsed))
        return self._clock[1]

    def check_ranks(self, loop: Any, raw: dict[str, Tensor]) -> None:
        """At the first step this plan trains under a process group: refuse ranks whose
        problems or values differ (:func:`~hyperdiff.tuner.distributed.agree.check_ranks_agree`)."""
        if self._agreed:
            return
        group = loop_group(loop)
        if group is not None:
            check_ranks_agree(group, "HyperOptimizer", self.problems, raw)
        self._agreed = True

    def _travels_at_budget(self, loop: Any) -> bool:
        """Whether ``stopping.extend`` holds the budget back: at or past ``max_steps``, with a
        constant outer schedule (a cosine has decayed to 0 there), a value of the gradient
        phase still travels over the last ``stopping.travel`` steps."""
        stopping = loop.stopping
        if not stopping.extend or loop.step_index < stopping.max_steps:
            return False
        if loop.schedule != "constant" or not stopping.travel:
            return False
        phase = [r for r in loop.history if r.step >= self.gradient_start]
        return travelling(phase, loop.hparams, self._travellers, stopping.travel)

    def where(self, loop: Any) -> str:
        return f"outer step {loop.step_index}"

    def trainings(self, loop: Any) -> int:
        return self.sampler.trainings

    def begin(self, loop: Any, step: int) -> dict[str, Tensor]:
        """The values of ``step``: the global phase's point, else the loop's raw values; counts
        the step's first round of trainings, unless the values are outside their constraint
        (the guard fails such a step before it trains)."""
        if self._fresh is None:
            self._fresh = copy.deepcopy(loop.optimizer.state_dict())
        if 1 <= step < self.gradient_start:
            loop.set_raw(self._points[step - 1])
        raw = loop.raw
        try:  # values outside their constraint fail the step before it trains (the driver's
            # check): no training to count
            loop.guard.check_values(loop.hparams, raw, loop.value_dtypes)
        except NonFiniteError:
            return raw
        self.sampler.trainings += self.sampler.first_round
        return raw

    def evaluate(self, loop: Any, step: int, raw: dict[str, Tensor]) -> Outcome:
        """Train every slot at ``raw`` and combine their hypergradients; a point of the global
        phase trains plainly (the gradient phase follows none of their hypergradients), except
        with discrete hyperparameters (their hook wants every step's estimate) and with a
        data-parallel method (a plain training shards no batch: every rank would train the
        whole of it on its own, where the method's collectives keep the ranks' losses equal)."""
        self._evaluated, self._note = None, ""
        self.check_ranks(loop, raw)
        plain = (1 <= step < self.gradient_start and loop.discrete is None
                 and not self.data_parallel)
        outcome = sampled_outcome(loop, self.sampler, step, raw, plain)
        self._evaluated = (step, raw, None)
        return outcome

    def selection_loss(self, loop: Any, outcome: Outcome) -> float | None:
        """The slots' mean selection loss, measured where each was trained; for a step that
        beats the best, with ``confirm`` (or ``confirm_chaotic`` and a chaotic hypergradient),
        the mean with its confirmations (asked once a step: the value is kept for the second
        call)."""
        wanted = self.confirm or self.chaotic_count
        if not wanted or outcome.kept is None or self._evaluated is None:
            return outcome.kept
        step, raw, done = self._evaluated
        if done is not None:
            return done
        own = value = float(outcome.kept)
        count = self._confirmations(loop, step, value, outcome)
        if count:
            self.sampler.trainings += count * len(self.problems)
            value = confirmed(value, self.problems, loop.selection, raw, seed=loop.seed,
                              step=step, count=count)
        if count > self.confirm:
            self._note = (f"chaotic hypergradient (norm {outcome.fields['grad_norm']:.3g} > "
                          f"{CHAOS_RATIO:g} x max(|validation loss|, 1)): selection loss "
                          f"{own:.4g} confirmed on {count} more minibatch seeds, mean "
                          f"{value:.4g}")
        self._evaluated = (step, raw, value)
        return value

    def _confirmations(self, loop: Any, step: int, value: float, outcome: Outcome) -> int:
        """How many confirmations ``step`` gets: none unless ``value`` would make it the new
        best; then ``confirm``, and at least ``confirm_chaotic`` with a chaotic hypergradient
        (where the run allows it)."""
        if not self._beats_best(loop, step, value, outcome):
            return 0
        fields = outcome.fields
        rough = chaotic(fields.get("grad_norm"), fields["val_loss"])
        return max(self.confirm, self.chaotic_count if rough else 0)

    def _beats_best(self, loop: Any, step: int, value: float, outcome: Outcome) -> bool:
        """Whether ``value`` would make ``step`` the best (as the loop ranks, chaotic steps
        below calm ones: only a step ranked by its selection loss is confirmed)."""
        if ranking_loss(step, loop.tie_steps, True, self.gradient_start) != "selection":
            return False
        fields = outcome.fields
        return bool(loop.ranks_above_best("selection", value, fields["val_loss"],
                                          fields.get("grad_norm"))[0])

    def commit(self, loop: Any, outcome: Outcome, record: StepRecord) -> StepRecord:
        """In the global phase: name the point, and after the last go to the best step; at
        step 0 with ``explore_when`` ``"weak"`` or ``"broken"``, decide whether the phase runs."""
        broken = ""
        if self._note:
            record = dataclasses.replace(record, message="; ".join(filter(None, (
                record.message, self._note))))
        if record.step == 0 and self._waits_for_start():
            broken = self._start_verdict(record, outcome.untrained())
            if broken:
                self._points = self._candidates
        if record.step >= self.gradient_start:
            return self._revert(loop, record)
        if loop.stopped is not None and loop.stopped.startswith("converged"):
            loop.stopped = None  # one point's small hypergradient does not end the phase
        self._end_global_phase(loop, record.step)
        note = self._phase_note(record.step) + (f" ({broken})" if broken else "")
        return dataclasses.replace(record, message="; ".join(filter(None, (note,
                                                                           record.message))))

    def _revert(self, loop: Any, record: StepRecord) -> StepRecord:
        """When the ranking loss rose at each of the last ``revert`` successful steps after the
        best one and the last return (``record`` the last of them): the best step's values,
        the outer optimizer as before step 0 (both also the guard's last good snapshot) and
        the outer learning rate cut by the guard's ``shrink``; the record says so."""
        if not self.revert or loop.best is None or record.criterion is None:
            return record
        # every loss compared is of the kind that ranks this record, as the driver ranks it
        # (with outer.tie_steps the tied steps rank by val and the later ones by selection)
        key = ranking_loss(record.step, loop.tie_steps, record.selection_loss is not None,
                           self.gradient_start)
        field = f"{key}_loss"
        after = max(self.reverted[-1] if self.reverted else -1, int(loop.best["step"]),
                    self.gradient_start - 1)  # the global phase's points are no such steps
        losses = [getattr(r, field) for r in loop.history if r.status == "ok" and r.step > after]
        tail = [*losses, getattr(record, field)][-self.revert:]
        rising = all(later > earlier for earlier, later in itertools.pairwise(tail))
        best = loop.best.get(key, loop.best["value"])
        if len(tail) < self.revert or not rising or not tail[0] > best:
            return record
        self._start_from(loop, loop.best["raw"])  # a failure of the next step comes back here
        loop.guard.scale *= loop.guard.shrink
        self.reverted.append(record.step)
        note = (f"the ranking loss rose at each of the last {self.revert} steps: back to the "
                f"values of step {loop.best['step']}, outer learning rate cut to "
                f"{loop.guard.scale:.3g} x")
        return dataclasses.replace(record, message="; ".join(filter(None, (record.message,
                                                                           note))))

    def outer_options(self, optimizer: str) -> dict[str, Any]:
        """Keyword options of the outer optimizer: none (its defaults) offline."""
        return {}

    def rescue_start(self, loop: Any) -> bool:
        """Whether a failed step 0 goes on to the global phase's points (instead of ending the
        run: the guard has no good step to go back to but the start itself)."""
        if loop.step_index != 0 or not self._candidates:
            return False
        self._points = self._candidates
        return True

    def _waits_for_start(self) -> bool:
        return self.explore_when != "always" and bool(self._candidates) and not self._points

    def _start_verdict(self, record: StepRecord, untrained: Mapping[str, float]) -> str:
        """Why step 0 calls for the phase under ``explore_when``, or ``""``."""
        broken = broken_start(record, untrained)
        if broken or self.explore_when == "broken":
            return broken
        return weak_start(record, untrained)

    def counts_failure(self, loop: Any) -> bool:
        """Whether the failing step counts toward the guard's failures in a row and cuts the
        outer learning rate: a step of the gradient phase does, unless it failed at its start
        point with another one left (:meth:`_next_start`); the start and the points of a
        global phase are independent trials (asked after :meth:`rescue_start`)."""
        return loop.step_index >= self.gradient_start and self._next_start(loop) is None

    def give_up_advice(self, loop: Any, raw: dict[str, Tensor]) -> str:
        """What the guard advises when it gives up at ``raw``. A step after a failure trains
        at the restored good values themselves (another minibatch seed, no outer step), where
        the outer learning rate plays no part: the advice names the steps that trained there
        and the values (:func:`retried_advice`). Else (a failed outer step from them, the
        first of a row) the guard's own advice, a smaller outer learning rate; with
        ``signstep`` without its clipping, which cannot shorten a step that reads the
        hypergradient's sign alone."""
        retried = retried_advice(loop, raw)
        if retried:
            return retried
        if not isinstance(loop.optimizer, SignStep):
            return ""
        return (f"Lower the outer learning rate ({option('lr', 'outer.lr')}: signstep moves "
                "each value by its hypergradient's sign alone, so clipping would not shorten "
                "its steps), or bound the hyperparameters that drive training to diverge")

    def _next_start(self, loop: Any) -> int | None:
        """The global phase's step to start the gradient phase from instead, when every step
        of the gradient phase so far, the failing one included, failed at its start point
        (``global_phase.start_order``); ``None`` when one succeeded or none is left."""
        if not self._points or loop.best is None or loop.step_index < self.gradient_start:
            return None
        phase = [r for r in loop.history if r.step >= self.gradient_start]
        if len(restarts(loop.history, self.gradient_start)) != len(phase):
            return None  # a step of the gradient phase succeeded, or no point is left

        def ranking(record: StepRecord) -> float:
            key = ranking_loss(record.step, loop.tie_steps, record.selection_loss is not None,
                               self.gradient_start)
            return float(getattr(record, f"{key}_loss"))

        order = start_order(loop.history, self.gradient_start, int(loop.best["step"]), ranking)
        tried = len(phase) + 1
        return order[tried] if tried < len(order) else None

    def _start_from(self, loop: Any, raw: dict[str, Tensor]) -> None:
        """The gradient phase (re)starts at ``raw``: the outer optimizer as before step 0, and
        a failure of its first step comes back here (the guard's last good snapshot)."""
        loop.set_raw(raw)
        if self._fresh is not None:
            loop.optimizer.load_state_dict(copy.deepcopy(self._fresh))
        loop.guard.good = loop.snapshot(loop.raw)

    def failure_note(self, loop: Any, message: str) -> str:
        step = loop.step_index
        if step >= self.gradient_start:
            start = self._next_start(loop)
            if start is None:
                return message
            self._start_from(loop, self._start if start == 0 else self._points[start - 1])
            return (f"{message}; the gradient phase starts over from the values of step "
                    f"{start}, the next best of the global phase (a failure at its start "
                    "point leaves the outer learning rate as it was)")
        self._end_global_phase(loop, step)
        return (f"{self._phase_note(step)}: {message} (a failed point of the global phase "
                "leaves the outer learning rate as it was and does not count toward the "
                "failures in a row)")

    def _phase_note(self, step: int) -> str:
        where = "the start" if step == 0 else f"point {step} of {len(self._points)}"
        return f"global phase: {where}"

    def _end_global_phase(self, loop: Any, step: int) -> None:
        """After the global phase's last step: the best step's values and the outer optimizer
        as before step 0.

        Raises:
            NonFiniteError: the start and every point failed (:func:`all_failed`): there is
                no value to start the gradient phase from.
        """
        if step != self.gradient_start - 1:
            return
        if loop.best is None and all(r.status == "failed" for r in loop.history):
            raise all_failed(loop.history, step + 1)  # this step's failed record comes next
        if loop.best is not None:
            self._start_from(loop, loop.best["raw"])
        elif self._fresh is not None:
            loop.optimizer.load_state_dict(copy.deepcopy(self._fresh))

    # ------------------------------------------------------------------ guard and checkpoint
    def snapshot(self) -> dict[str, Any]:
        return {"warm": list(self.warm)}

    def restore(self, good: dict[str, Any]) -> None:
        self.sampler.warm = list(good["warm"])

    def state_dict(self, loop: Any) -> dict[str, Any]:
        state = {"warm": self.warm, "trainings": self.sampler.trainings,
                 "rng": torch.get_rng_state(),
                 "seed": loop.seed}  # the global phase's points and the minibatch seeds
        if isinstance(loop.method, DataParallelMethod):  # its numbers are of this world size
            state[WORLD_KEY] = torch_world(loop_group(loop))
        if self.explore_when != "always" and self._candidates:
            state["explored"] = bool(self._points)  # decided at step 0
        if self.revert:
            state["reverted"] = list(self.reverted)
        return state

    def load_state_dict(self, loop: Any, state: dict[str, Any],
                        history: Sequence[StepRecord] | None) -> list[StepRecord]:
        """Check ``state`` against ``history`` (required), then restore the plan's part."""
        if history is None:
            refuse_online_state(state)  # before the history an online state would not need
            raise fail("HyperOptimizer.load_state_dict", "history",
                       "the run's records (offline checkpoints hold none)", history)
        state = world_checked("HyperOptimizer", state, loop.method)
        if self.warm_start and "explored" in state:  # saved before warm starts had no phase
            if state["explored"] is True:
                raise HyperdiffError(
                    "HyperOptimizer: the checkpoint is of a warm-start run that ran a global "
                    "phase, which warm-start runs no longer have (its points trained on from "
                    "each other's theta_T); it cannot be resumed: start a new run")
            state = {key: value for key, value in state.items() if key != "explored"}
        check_driver_state(loop, self, state, history)
        if self._fresh is None:  # the loop's optimizer is still the one it made
            self._fresh = copy.deepcopy(loop.optimizer.state_dict())
        self.sampler.warm = list(state["warm"])
        self.sampler.trainings = int(state["trainings"])
        torch.set_rng_state(state["rng"])
        if "explored" in state:
            self._points = self._candidates if state["explored"] else []
        self.reverted = list(state.get("reverted", []))
        return list(history)

    def result(self, loop: Any) -> OptimizeResult:
        """The best step's values, the history and the stop reason."""
        if loop.best is None:
            if loop.history and all(r.status == "failed" for r in loop.history):
                raise all_failed(loop.history, len(loop.history))
            raise HyperdiffError("HyperOptimizer: no successful step yet, so no result")
        return OptimizeResult(
            best_raw=dict(loop.best["raw"]),
            best_hparams=loop.hparams.with_raw(loop.best["raw"]),
            best_step=int(loop.best["step"]),
            best_loss=float(loop.best["value"]),
            criterion=ranking_name(loop.tie_steps, loop.selection is not None,
                                   self.gradient_start),
            final_raw=loop.raw,
            history=History(list(loop.history)),
            stop_reason=loop.stop_reason() or "not finished",
        )


def all_failed(history: Sequence[StepRecord], count: int) -> NonFiniteError:
    """The error of a run whose ``count`` outer steps, the start and the global phase's points
    (``history``: their records, step 0's first), all failed: it names step 0's failure."""
    return NonFiniteError(
        f"HyperOptimizer: all {count} outer steps failed, the start and the global phase's "
        f"points tried after it; step 0: {history[0].message}. Start from safer values (e.g. a "
        "smaller inner learning rate or fewer inner steps)")


def retried_advice(loop: Any, raw: dict[str, Tensor]) -> str:
    """The guard's advice when the step failing at ``raw`` trained at its last good values
    themselves (``""`` otherwise): it and the failed steps just before it at those values
    (history records with the same natural values) re-trained them, where no smaller outer
    step changes anything."""
    good = loop.guard.good
    if good is None or any(not torch.equal(raw[n], good["raw"][n]) for n in raw):
        return ""
    values = natural_values(loop.hparams, raw)
    steps = [loop.step_index]
    for record in reversed(loop.history):
        if record.status != "failed" or record.hparams != values:
            break
        steps.insert(0, record.step)
    which = (f"step {steps[0]}" if len(steps) == 1
             else f"steps {steps[0]}-{steps[-1]}")
    return (f"The last {'' if len(steps) == 1 else f'{len(steps)} '}failed "
            f"{'step' if len(steps) == 1 else 'steps'} ({which}) trained at the last good "
            f"values themselves ({start_values(loop.hparams, raw)}), which a smaller outer "
            "step does not change: training diverges there on some minibatch orders (or from "
            "some warm starts). Lower the inner learning rate or the number of inner steps, "
            "or bound the hyperparameters that drive training to diverge")


def check_warm_explore(warm_start: bool, explore: int, decades: float, when: str) -> None:
    """Refuse a global phase asked for with warm starts (module doc): ``explore`` other than 0
    or its default 8, or with a phase ``explore_decades`` or ``explore_when`` other than
    their defaults."""
    if not warm_start:
        return
    why = (f"with {option('warm_start=True', 'inner.warm_start = true')} (a warm-started step "
           "trains on from the last step's theta_T, so the points of a global phase would be "
           "a chain of trainings ranked by how far each trained, not independent trials: "
           "warm-start runs have no global phase)")
    if explore not in (0, 8):
        raise fail("HyperOptimizer", option("explore", "outer.explore"),
                   f"0 or its default 8 {why}", explore)
    for name, value, default in (("explore_when", when, "weak"),
                                 ("explore_decades", decades, 2.0)):
        if explore and value != default:
            raise fail("HyperOptimizer", option(name, f"outer.{name}"),
                       f"its default {default!r} {why}", value)


def offline_method(loop: Any, caller: str) -> Method:
    """``loop.method`` built from its name if it is one, set on the loop; refused unless it is
    a :class:`Method` usable offline and its own check (``Method.check``: ``curvature``'s
    optimizers) accepts every problem."""
    method = make_method(loop.method) if isinstance(loop.method, str) else loop.method
    if not isinstance(method, Method) or not method.capabilities.offline:
        raise fail(caller, "method", "a Method usable offline or one of "
                   f"{sorted(methods_where(offline=True))}", method)
    for problem in loop.problems:
        method.check(problem)
    loop.method = method
    return method


def check_confirm(confirm: int, warm_start: bool, loop: Any) -> None:
    """Refuse ``confirm`` where a confirmation would not repeat the step's training: warm
    starts (each slot goes on from its last theta) and discrete choices (drawn per slot)."""
    if confirm and (warm_start or loop.discrete is not None):
        why = "warm_start" if warm_start else "discrete hyperparameters"
        raise fail("HyperOptimizer", "confirm", f"0 with {why} (a confirmation trains from "
                   "theta_0 with continuous values only)", confirm)
    if confirm and loop.selection is None:
        raise fail("HyperOptimizer", option("confirm", "outer.confirm"), "0 without a "
                   "selection split (a confirmation ranks a would-be best by the mean selection "
                   "loss of more trainings; without one the steps are ranked by the validation "
                   "loss the hypergradient descends, and nothing is confirmed)", confirm)


def check_extend(loop: Any) -> None:
    """Refuse ``stopping.extend`` where it can never hold the budget back: a cosine outer
    schedule (decayed to 0 at the budget, nothing travels) or ``stopping.travel = 0``."""
    stopping = loop.stopping
    if stopping.extend and (loop.schedule != "constant" or not stopping.travel):
        why = (f"the {loop.schedule} outer schedule, decayed to 0 at the budget"
               if loop.schedule != "constant" else option("stopping.travel = 0",
                                                          "stop.travel = 0"))
        raise fail("HyperOptimizer", option("stopping.extend", "stop.extend"), "0 with "
                   f"{why} (it holds the budget back while a value travels at a constant outer "
                   "schedule, over the last stop.travel steps)", stopping.extend)


def sampled_outcome(loop: Any, sampler: Sampler, step: int, raw: dict[str, Tensor],
                    plain: bool = False) -> Outcome:
    """Train every slot of ``sampler`` at ``raw``; the step's mean hypergradient, losses and
    record fields (the selection loss is the outcome's ``kept``); ``plain``: losses only
    (``grad=None``: the loop takes no outer step)."""
    evaluations, selection = sampler.evaluate(step, raw, plain)
    group = current_group(sampler.method.group) if isinstance(
        sampler.method, DataParallelMethod) else None
    if group is not None and selection is not None:  # BatchNorm's buffers are per rank
        (selection,) = agreed_mean(group, f"outer step {step}: the selection loss",
                                   [selection])
    problems = sampler.problems
    train_loss = sum(hg.train_loss for hg in evaluations) / len(evaluations)
    if plain:
        grad = None
        fields = {"train_loss": train_loss, **plain_fields(evaluations, len(problems))}
    else:
        found = sampler.estimate(step, raw, evaluations)
        grad = loop.hparams.unflatten(found.mean)
        fields = {"train_loss": train_loss, **estimate_fields(loop.hparams, found)}

    @functools.cache  # the guard's reference and the broken-start test read it at step 0
    def untrained() -> dict[str, float]:
        return untrained_losses(problems, raw, None, loop.selection)

    return Outcome(grad, [hg.value for hg in evaluations], fields, untrained, selection)


__all__ = ["OfflinePlan", "all_failed", "check_confirm", "check_warm_explore", "offline_method",
           "retried_advice", "sampled_outcome"]
