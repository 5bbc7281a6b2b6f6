"""Pipeline timelines: an event simulation of who computes what when, and idle fractions.

:func:`simulate` and a :class:`~localopt.pipeline.PipelineStep` produce the same
:class:`localopt.pipeline.Event` lists; :func:`idle_fractions` measures the pipeline bubble in
them (``recipes.plots.plot_timelines`` draws them: this module needs torch alone).

Simulation
----------
:func:`simulate` replays a schedule's dependency graph with given per-stage costs, for ``S``
stages, ``M`` micro-batches and one or more consecutive training steps (a stage starts the
next step after its own optimizer step, with no barrier), and returns the makespan per
step, images/s, the idle fraction of every stage and the simulated events.  Each stage is
one worker (one process, one thread) that runs its operations one at a time.  A message
(activation, gradient, output error ``e``) is sent at the end of an operation and, as in
gloo, moves only once the receiver has posted its receive -- when it is ready for the
operation that needs it (torch's GPipe and 1F1B), or at the start of its step (localopt's
direct schedule, torch's zero-bubble runtime) -- arriving ``latency + bytes * per_byte``
later; the transfer costs neither side compute.  Torch's waits on earlier sends (1F1B,
GPipe) and every stage's end-of-step wait on its sends are dependencies too.  On the direct
schedules, each step's batch reaches the ranks when all of them have finished their call of
the step before (``pipe.step`` begins with an all-gather of batch headers).

* ``gpipe``: every stage runs ``F_0 .. F_{M-1}`` then ``B_0 .. B_{M-1}``
  (Huang et al. 2019, torch's ``ScheduleGPipe``).  ``B`` of stage ``s`` for micro-batch
  ``i`` needs the input gradient of ``B_i`` on stage ``s+1``.  With unit costs and free
  communication the bubble is ``(S-1)/(M+S-1)`` of the step.
* ``1f1b``: ``min(M, S-s)`` warm-up forwards, then alternately one backward and one forward,
  then the remaining backwards (Narayanan et al. 2019, torch's ``Schedule1F1B``).
* ``zb``: torch's zero-bubble order (``ScheduleZBVZeroBubble``, V-shape, or
  ``ScheduleInterleavedZeroBubble``; Qi et al. 2024): two virtual stages per process, the
  backward split into the input gradient ``I`` (on the critical path) and the weight
  gradient ``W`` (deferred into the bubbles).  The order is taken from torch itself.
* ``direct`` (``dfa``, ``bdfa``, ``dkp``, module-wise ``dfa``): the backward ``D`` of stage
  ``s`` for micro-batch ``i`` needs only its own forward ``F_i`` and the output error
  ``e_i``, which the last stage sends to every stage right after its forward (and loss);
  no gradient crosses a stage boundary.  Each stage's order is that of
  :class:`~localopt.pipeline.policy.DirectPolicy`, the object the runner uses (a ready
  forward first, else the oldest ready backward; at most ``max_in_flight`` micro-batches in
  flight); ``asynchronous=True``: no flush between steps (the policy's docstring).
* ``drtp``: ``D`` needs only the target (one micro-batch in flight: ``F_0, D_0, F_1, ...``).

Costs are per stage (:class:`StageCost`): forward and backward time per micro-batch (the
backward of a backprop schedule; its input- and weight-gradient parts for ``zb``; the
backward of a direct rule, which has no input gradient at the stage boundary), the bytes
of the activation sent to the next stage, and the optimizer step.  :func:`deepen` builds
the costs of more stages from measured ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from .policy import DirectPolicy, check_bound

__all__ = ["StageCost", "CommCost", "SimResult", "simulate", "deepen", "idle_fractions",
           "plot_timeline", "plot_timelines", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b", "zb", "direct", "drtp")
BACKPROP = ("gpipe", "1f1b", "zb")


# --------------------------------------------------------------------------- cost model

@dataclass(frozen=True)
class StageCost:
    """Measured (or assumed) costs of one pipeline stage, in seconds per micro-batch.

    Attributes:
        forward: forward of one micro-batch (on the last stage: including the loss).
        backward: backprop backward of one micro-batch (input and weight gradients).
        backward_input: the input-gradient part of ``backward`` (zero-bubble ``I``);
            default half of ``backward``.
        backward_weight: the weight-gradient part (zero-bubble ``W``); default
            ``backward - backward_input``.
        direct: backward of a direct-feedback rule on this stage (weight gradients and the
            projections of ``e``, no input gradient at the stage boundary); default
            ``backward``.
        act_bytes: bytes of the activation this stage sends to the next one per micro-batch
            (its gradient, sent back by backprop, has the same size).
        step: optimizer step, once per training step.
    """
    forward: float
    backward: float
    backward_input: float | None = None
    backward_weight: float | None = None
    direct: float | None = None
    act_bytes: float = 0.0
    step: float = 0.0

    @property
    def input_part(self) -> float:
        return self.backward / 2 if self.backward_input is None else self.backward_input

    @property
    def weight_part(self) -> float:
        if self.backward_weight is not None:
            return self.backward_weight
        return max(self.backward - self.input_part, 0.0)

    @property
    def direct_part(self) -> float:
        return self.backward if self.direct is None else self.direct


@dataclass(frozen=True)
class CommCost:
    """A message of ``n`` bytes arrives ``latency + n * per_byte`` seconds after both its send
    and its receive are posted (gloo's rendezvous).  ``CommCost()`` is a free link;
    :meth:`of` builds one from a bandwidth and a latency."""
    latency: float = 0.0
    per_byte: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency", "per_byte"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or \
                    v == float("inf"):
                raise ValueError(f"CommCost: {name}={v!r} must be a finite number >= 0")

    @classmethod
    def of(cls, bandwidth_gbit: float, latency: float) -> "CommCost":
        """A link of ``bandwidth_gbit`` Gbit/s (1e9 bits per second) and ``latency`` seconds,
        both positive numbers."""
        for name, v in (("bandwidth_gbit", bandwidth_gbit), ("latency", latency)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"CommCost.of: {name}={v!r} must be a positive number "
                                 "(bandwidth in Gbit/s, latency in seconds)")
        return cls(latency=float(latency), per_byte=8.0 / (bandwidth_gbit * 1e9))

    def time(self, nbytes: float) -> float:
        return self.latency + self.per_byte * nbytes


class SimResult(NamedTuple):
    schedule: str
    stages: int
    microbatches: int
    makespan: float                # seconds per training step
    images_per_s: float            # batch / makespan
    idle_fraction: list[float]     # per stage (process): 1 - busy / makespan
    events: list                   # list[localopt.pipeline.Event]


def _event_type():
    from . import Event
    return Event


# --------------------------------------------------------------------------- the engine

@dataclass
class _Op:
    key: tuple                     # (step, virtual stage, kind, microbatch)
    rank: int
    duration: float
    kind: str                      # event kind
    deps: list = field(default_factory=list)    # inputs: [(key, delay)]
    sent: list = field(default_factory=list)    # sends that must be delivered before: [key]
    post_after_sent: bool = False  # the input's recv is posted only after those deliveries


def _run(ops: dict, order: Mapping[int, Any], nranks: int, recv: str
         ) -> tuple[list[tuple], float, dict[tuple, float]]:
    """Replay ``ops``.  ``order[r]`` is a fixed list of op keys for rank ``r``, or a
    :class:`_PolicyOrder` whose ``candidates()`` name the ops rank ``r``'s state allows,
    preferred first, and whose ``done(key)`` records one (returning the steps whose receives
    it posts then).  A policy rank runs, as soon as it is free, the first candidate whose
    inputs have arrived, or waits for the first to arrive; decisions are taken in time order,
    so it sees exactly the messages that have arrived by then.

    Messages meet as in gloo: a transfer starts when the sender has sent *and* the receiver
    has posted its receive (``recv="late"``: when the receiving rank is ready for the op that
    needs it, as torch's single-stage schedules post them; ``"early"``: when the receiving
    rank starts the step, as localopt's direct schedule and torch's zero-bubble runtime do),
    and is delivered ``delay`` later; a send's completion is that delivery.
    Returns (records (rank, kind, microbatch, start, end), makespan, end time of every op)."""
    end: dict[tuple, float] = {}
    post: dict[tuple, float] = {}                   # when the rank became ready for the op
    step_start: dict[tuple, float] = {}             # (rank, step) -> when it began the step
    free = [0.0] * nranks
    pos = {r: 0 for r in range(nranks)}
    todo = {r: sum(op.rank == r for op in ops.values()) for r in range(nranks)}
    nxt: dict[int, tuple | None] = {r: None for r in range(nranks)}
    inputs = {k: {d: delay for d, delay in op.deps} for k, op in ops.items()}
    consumers: dict[tuple, list] = {k: [] for k in ops}
    for k, op in ops.items():
        for d, _ in op.deps:
            if ops[d].rank != op.rank:
                consumers[d].append(k)
    records: list[tuple] = []
    for r in range(nranks):
        if isinstance(order[r], _PolicyOrder):
            step_start[(r, 0)] = 0.0

    def delivered(src: tuple, dst: tuple) -> float | None:
        """When the message of ``src`` for ``dst`` arrives (None: not known yet)."""
        delay = inputs[dst][src]
        if src not in end:
            return None
        if ops[src].rank == ops[dst].rank:
            return end[src] + delay
        if recv == "early":
            posted = step_start.get((ops[dst].rank, dst[0]))
        else:
            posted = posted_at(dst)
        return None if posted is None else max(end[src], posted) + delay

    def sends_done(key: tuple) -> float | None:
        t = 0.0
        for src in ops[key].sent:
            for dst in consumers[src]:
                a = delivered(src, dst)
                if a is None:
                    return None
                t = max(t, a)
        return t

    def posted_at(key: tuple) -> float | None:
        if key not in post:
            return None
        if not ops[key].post_after_sent:
            return post[key]
        done = sends_done(key)
        return None if done is None else max(post[key], done)

    def arrival(key: tuple) -> float | None:
        t = sends_done(key)
        if t is None:
            return None
        for src in inputs[key]:
            a = delivered(src, key)
            if a is None:
                return None
            t = max(t, a)
        return t

    def ready_for(r: int, key: tuple) -> None:
        post[key] = free[r]
        step_start.setdefault((r, key[0]), free[r])

    while any(todo.values()):
        best = None                                  # (time, rank, key)
        for r in range(nranks):
            if not todo[r]:
                continue
            if isinstance(order[r], _PolicyOrder):
                first = None
                pol = order[r]
                for key in pol.candidates():
                    post.setdefault(key, free[r])
                    a = arrival(key)
                    if a is not None:
                        a = max(free[r], a, pol.not_before(key))
                        if first is None or a < first[0]:
                            first = (a, key)
                if first is None:
                    continue
                t = first[0]                          # the preferred one arrived by then
                key = next(k for k in pol.candidates() if arrival(k) is not None
                           and max(arrival(k), pol.not_before(k)) <= t)
                cand = (t, r, key)
            else:
                if nxt[r] is None:
                    nxt[r] = order[r][pos[r]]
                    ready_for(r, nxt[r])
                a = arrival(nxt[r])
                if a is None:
                    continue
                cand = (max(free[r], a), r, nxt[r])
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            stuck = {r: order[r].candidates() if isinstance(order[r], _PolicyOrder) else nxt[r]
                     for r in range(nranks) if todo[r]}
            raise RuntimeError(f"pipeline simulation deadlocked; waiting ops: {stuck}")
        t, r, key = best
        op = ops[key]
        if t > free[r]:
            records.append((r, "wait", key[-1], free[r], t))
        end[key] = t + op.duration
        records.append((r, op.kind, key[-1], t, end[key]))
        free[r] = end[key]
        todo[r] -= 1
        pos[r] += 1
        nxt[r] = None
        if isinstance(order[r], _PolicyOrder):
            for rank, k, at in order[r].done(key, free[r]):   # a batch given: its receives
                step_start.setdefault((rank, k), at)          # are posted then
    return records, max(free), end


class _BatchCheck:
    """The all-gather of batch headers that begins every ``pipe.step`` on every rank
    (:mod:`localopt.pipeline.batch`): step ``k``'s batch reaches the ranks ``latency`` after
    the last of them has finished its call of step ``k - 1``."""

    def __init__(self, nranks: int, latency: float) -> None:
        self.n, self.latency = nranks, latency
        self.entered: dict[int, list[float]] = {}
        self.orders: list = []

    def enter(self, k: int, at: float) -> list[tuple[int, int, float]]:
        got = self.entered.setdefault(k, [])
        got.append(at)
        if len(got) < self.n:
            return []
        t = max(got) + self.latency
        return [(o.r, k, t) for o in self.orders if o.give(k, t)]


class _PolicyOrder:
    """A rank's :class:`~localopt.pipeline.policy.DirectPolicy` over ``steps`` steps, as the
    runner drives it: the call of step ``k`` returns at ``step_done(k)``, the update is asked
    for right then, the batch of step ``k+1`` arrives when every rank has returned
    (:class:`_BatchCheck`), and the last update runs as a flush."""

    def __init__(self, policy, rank: int, steps: int, check: _BatchCheck) -> None:
        self.p, self.r, self.steps, self.check = policy, rank, steps, check
        self.given = {0: 0.0}
        self.returned = 0                    # calls returned
        policy.available = 1
        check.orders.append(self)

    def candidates(self) -> list[tuple]:
        p = self.p
        keys = []
        for kind, k, m in p.candidates(flush=p.nu == self.steps - 1):
            keys.append((k, self.r, "S", -1) if kind == "U" else (k, self.r, kind, m))
        return keys

    def not_before(self, key: tuple) -> float:
        return self.given.get(key[0], 0.0) if key[2] in ("F", "D") else 0.0

    def give(self, k: int, at: float) -> bool:
        if k >= self.steps or k in self.given:
            return False
        self.given[k] = at
        self.p.available = max(self.p.available, k + 1)
        return True

    def done(self, key: tuple, at: float) -> list[tuple[int, int, float]]:
        k, _, kind, m = key
        self.p.done(("U", k, -1) if kind == "S" else (kind, k, m))
        begun = []
        while self.returned < self.steps and self.p.step_done(self.returned):
            self.p.requested = max(self.p.requested, self.returned + 1)   # opt.step()
            if not self.p.asynchronous and self.p.nu <= self.returned:
                break                        # synchronous: the update before the next step
            self.returned += 1
            begun += self.check.enter(self.returned, at)
        return begun


def _zb_order(S: int, M: int, variant: str) -> list[list[tuple]]:
    """torch's zero-bubble order: per rank, [(virtual stage, 'F'|'I'|'W', microbatch)]."""
    try:
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    except ImportError as exc:                       # pragma: no cover - torch version
        raise RuntimeError("simulate(schedule='zb') takes the zero-bubble order from "
                           "torch.distributed.pipelining, which this torch lacks") from exc
    name = {"zbv": "ZBVZeroBubble", "interleaved": "InterleavedZeroBubble"}[variant]
    rows = get_schedule_ops(name, S, M, num_stages_per_rank=2)
    kinds = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W", "FULL_BACKWARD": "I"}
    out = []
    for row in rows:
        acts = []
        for a in row:
            t = None if a is None else kinds.get(str(a.computation_type).split(".")[-1])
            if t is not None:
                acts.append((a.stage_index, t, a.microbatch_index))
        out.append(acts)
    return out


def simulate(costs: Sequence[StageCost], schedule: str, microbatches: int, *,
             link: CommCost = CommCost(), e_link: CommCost | None = None, e_bytes: float = 0.0,
             batch: float | None = None, steps: int = 1, zb_variant: str = "zbv",
             virtual_costs: Sequence[StageCost] | None = None, asynchronous: bool = False,
             max_in_flight: int | None = None, warmup: int = 0) -> SimResult:
    """Simulate ``steps`` training steps of ``schedule`` on ``len(costs)`` stages (processes).

    Args:
        costs: per stage.
        schedule: ``"gpipe"``, ``"1f1b"``, ``"zb"``, ``"direct"`` or ``"drtp"``.
        microbatches: ``M``.
        link: activations and their gradients between neighbouring stages.
        e_link, e_bytes: the output error ``e`` of one micro-batch, sent by the last stage to
            every other stage (``direct``); ``e_link`` defaults to ``link``.
        batch: images per training step (for ``images_per_s``); default ``microbatches``.
        steps: consecutive steps; a stage starts step ``k+1`` right after its own optimizer
            step of step ``k`` (no barrier between steps, as in the measured runs).
        zb_variant: ``"zbv"`` (torch's ``ScheduleZBVZeroBubble``) or ``"interleaved"``
            (``ScheduleInterleavedZeroBubble``).
        virtual_costs: ``zb`` only: the costs of the ``2 S`` virtual stages in model order;
            default: every process's stage cut into two halves of equal cost.
        asynchronous, max_in_flight: ``direct``/``drtp``: the runner's options
            (:class:`~localopt.pipeline.policy.DirectPolicy`, the object the runner uses).
        warmup: 0 (default): the makespan per step is the total over ``steps``, filling and
            draining the pipeline included.  ``warmup = w > 0``: the steady state a long
            training runs in, as ``recipes.pipeline`` times it (after untimed warm-up
            steps, up to the last step's return): the time from the end of step ``w - 1``
            to the end of step ``steps - 2`` (a step ends with the last of its optimizer
            updates over the stages), over ``steps - 1 - w`` steps.  It differs from the
            total only for a schedule that does not flush: the asynchronous one fills the
            pipeline once per training, not once per step.  Needs ``steps >= w + 2``.

    Returns: :class:`SimResult` with the makespan *per step* (``warmup``); its events
    carry the process index as ``stage``, kinds ``forward``, ``backward`` (``zb``: the input
    gradient), ``backward_weight`` (``zb``: the deferred weight gradient), ``step`` (the
    optimizer step, when it costs anything) and ``wait`` (idle until a message arrives).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"simulate: schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    S, M = len(costs), int(microbatches)
    if S < 1 or M < 1 or steps < 1:
        raise ValueError(f"simulate: need at least one stage, micro-batch and step (got S={S}, "
                         f"M={M}, steps={steps})")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0 or \
            (warmup and steps < warmup + 2):
        raise ValueError(f"simulate: warmup={warmup!r} must be an int >= 0, and steps >= "
                         f"warmup + 2 when it is not 0 (got steps={steps})")
    if asynchronous and schedule in BACKPROP:
        raise ValueError(f"simulate: asynchronous=True runs the direct schedules only; "
                         f"schedule={schedule!r} needs the next stage's gradient")
    check_bound(max_in_flight)
    e_link = link if e_link is None else e_link
    if schedule == "zb":
        V = 2 * S
        if virtual_costs is None:
            virtual_costs = []
            for c in costs:
                half = StageCost(c.forward / 2, c.backward / 2, c.input_part / 2,
                                 c.weight_part / 2, None, c.act_bytes, c.step / 2)
                virtual_costs += [half, half]
        if len(virtual_costs) != V:
            raise ValueError(f"simulate: zb needs {V} virtual stage costs, got "
                             f"{len(virtual_costs)}")
        if zb_variant not in ("zbv", "interleaved"):
            raise ValueError(f"simulate: zb_variant={zb_variant!r}: choose 'zbv' or "
                             "'interleaved'")
        rank_of = ([v if v < S else V - 1 - v for v in range(V)] if zb_variant == "zbv"
                   else [v % S for v in range(V)])
        vc = list(virtual_costs)
    else:
        V, rank_of, vc = S, list(range(S)), list(costs)

    def delay(src: int, dst: int, nbytes: float, lk: CommCost = link) -> float:
        return 0.0 if rank_of[src] == rank_of[dst] else lk.time(nbytes)

    zb_rows = _zb_order(S, M, zb_variant) if schedule == "zb" else None
    check = _BatchCheck(S, 2 * link.latency if S > 1 else 0.0)
    ops: dict[tuple, _Op] = {}
    order: dict[int, Any] = {}
    for k in range(steps):
        for v, c in enumerate(vc):
            r = rank_of[v]
            for i in range(M):
                fd = [((k, v - 1, "F", i), delay(v - 1, v, vc[v - 1].act_bytes))] if v else []
                ops[(k, v, "F", i)] = _Op((k, v, "F", i), r, c.forward, "forward", fd)
                back = [((k, v, "F", i), 0.0)]
                if schedule in ("gpipe", "1f1b", "zb"):
                    kind = "I" if schedule == "zb" else "B"
                    if v < V - 1:
                        back.append(((k, v + 1, kind, i), delay(v + 1, v, c.act_bytes)))
                    dur = c.input_part if schedule == "zb" else c.backward
                    ops[(k, v, kind, i)] = _Op((k, v, kind, i), r, dur, "backward", back)
                    if schedule == "zb":
                        ops[(k, v, "W", i)] = _Op((k, v, "W", i), r, c.weight_part,
                                                  "backward_weight", [((k, v, "I", i), 0.0)])
                else:
                    if schedule == "direct" and v < V - 1:
                        back.append(((k, V - 1, "F", i), e_link.time(e_bytes)))
                    ops[(k, v, "D", i)] = _Op((k, v, "D", i), r, c.direct_part, "backward",
                                              back)
        mine: dict[int, list] = {r: [] for r in range(S)}
        for key, op in ops.items():
            if key[0] == k:
                mine[op.rank].append(key)
        for r in range(S):
            if schedule == "gpipe":
                seq = [(k, r, "F", i) for i in range(M)] + [(k, r, "B", i) for i in range(M)]
                ops[seq[M]].sent = seq[:M]              # forward sends waited, then B recvs
                ops[seq[M]].post_after_sent = True
            elif schedule == "1f1b":
                w = min(M, S - r)
                seq, f = [(k, r, "F", i) for i in range(w)], w
                for b in range(M):
                    seq.append((k, r, "B", b))
                    if f < M:
                        seq.append((k, r, "F", f))
                        f += 1
                for n in range(2, len(seq)):            # torch's waits on earlier sends
                    cur, prev, prev2 = seq[n], seq[n - 1], seq[n - 2]
                    if cur[2] != prev[2]:                # 1B1F: the send of the op before is
                        ops[cur].sent = [prev] + ([prev2] if prev2[2] == prev[2] else [])
                    else:                                # fused with this op's receive
                        ops[cur].sent = [prev2]          # warm-up / cool-down: one op later
            elif schedule == "zb":
                seq = [(k, *a) for a in zb_rows[r]]
                if k == 0 and sorted(seq) != sorted(mine[r]):
                    raise RuntimeError(f"simulate: torch's {zb_variant} order for rank {r} "
                                       "does not cover every F/I/W op once")
            else:                                       # direct, drtp: the policy's order
                seq = None
            cost = sum(vc[v].step for v in range(V) if rank_of[v] == r)
            skey = (k, r, "S", -1)                      # every send delivered, then the update
            ops[skey] = _Op(skey, r, cost, "step", [(key, 0.0) for key in mine[r]],
                            sent=list(mine[r]))
            if seq is None:
                if r not in order:
                    order[r] = _PolicyOrder(DirectPolicy(
                        r, S, M, waits_for_error=schedule == "direct" and r < S - 1,
                        asynchronous=asynchronous, max_in_flight=max_in_flight), r, steps,
                        check)
            else:
                order.setdefault(r, []).extend(seq + [skey])
    if schedule in BACKPROP:                          # a stage's next step starts after its
        for key, op in ops.items():                   # own optimizer step (direct: the policy)
            if key[0] > 0:
                op.deps.append(((key[0] - 1, op.rank, "S", -1), 0.0))
    recv = "late" if schedule in ("gpipe", "1f1b") else "early"
    records, total, end = _run(ops, order, S, recv)
    records = [rec for rec in records if not (rec[1] == "step" and rec[4] == rec[3])]
    Event = _event_type()
    events = sorted((Event(r, kind, mb, start, end) for r, kind, mb, start, end in records),
                    key=lambda e: (e.stage, e.start))
    makespan = total / steps
    if warmup:
        step_end = [max(end[(k, r, "S", -1)] for r in range(S)) for k in range(steps)]
        makespan = (step_end[steps - 2] - step_end[warmup - 1]) / (steps - 1 - warmup)
    idle = idle_fractions(events, S, total)
    images = M if batch is None else batch
    return SimResult(schedule, S, M, makespan, images / makespan, idle, events)


BUSY = ("forward", "backward", "backward_weight", "step", "send", "recv")


def idle_fractions(events: Iterable, stages: int, span: float | None = None,
                   start: float | None = None) -> list[float]:
    """Per stage: ``1 - busy / span``, busy = the summed duration of its compute and
    communication events (``wait`` and gaps are idle); ``span`` defaults to the time from
    the first event's start to the last event's end over all stages."""
    events = list(events)
    if not events:
        return [1.0] * stages
    t0 = min(e.start for e in events) if start is None else start
    if span is None:
        span = max(e.end for e in events) - t0
    busy = [0.0] * stages
    for e in events:
        if e.kind in BUSY and 0 <= e.stage < stages:
            busy[e.stage] += e.end - e.start
    return [max(0.0, 1.0 - b / span) if span > 0 else 0.0 for b in busy]


def deepen(costs: Sequence[StageCost], stages: int, assumption: str = "blocks") -> list[StageCost]:
    """Costs of ``stages`` stages from measured ones.

    * ``"blocks"`` (a deeper model of the same blocks): every stage costs the mean of the
      measured stages (forward, backward and its parts, direct backward, optimizer step);
      activations of the same size cross every boundary.  The per-stage compute stays
      fixed while ``S`` grows, like adding layers of the same width.
    * ``"finer"`` (the same model cut finer): the measured total cost split evenly over
      ``stages`` stages; activation size unchanged, so communication weighs more as ``S``
      grows.
    """
    if assumption not in ("blocks", "finer"):
        raise ValueError(f"deepen: assumption={assumption!r}: choose 'blocks' or 'finer'")
    n = len(costs)
    div = n if assumption == "blocks" else stages

    def total(f) -> float:
        return sum(f(c) for c in costs) / div

    act = [c.act_bytes for c in costs[:-1]] or [0.0]
    stage = StageCost(forward=total(lambda c: c.forward), backward=total(lambda c: c.backward),
                      backward_input=total(lambda c: c.input_part),
                      backward_weight=total(lambda c: c.weight_part),
                      direct=total(lambda c: c.direct_part), act_bytes=sum(act) / len(act),
                      step=total(lambda c: c.step))
    return [stage] * stages
