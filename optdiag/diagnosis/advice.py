"""What to change, with numbers: one list of :class:`Suggestion` per diagnosed kind.

Every proposed number is derived from the evidence and the optimizer's stability threshold
(:mod:`optdiag.diagnosis.stability`); the margins are justified in ``docs/diagnosis-rules.md``:

* target stability ratio ``TARGET_RATIO = 0.5``: sharpness at half the threshold, i.e. ``lr * lambda_max = 1`` for
  SGD, where sign flips stop; small noisy batches are unsafe well before the deterministic threshold
  (docs/theory.md section 1);
* ``ReduceLROnPlateau(factor=0.5)``: halve the step once bouncing at a loss floor (Chee & Toulis 2018);
* a decade (``x10``) at most per lr increase, and x0.1 when nothing tells a safe lr (SASA, Lang et al. 2019);
* warmup ``LinearLR(start_factor=s, total_iters=ceil(100 (1 - s) / s))``: the lr grows by 1% of its start per step;
* batch size toward McCandlish's ``B_simple = tr(Sigma) / |G|^2`` when noise dominates, up to ``B_simple / 4`` as a
  free raise, and down toward 32 when the generalization gap and the sharpness grow (:func:`batch_size_advice`);
* Polyak's heavy-ball pair for the curvature range ``[max(lambda_min, lambda_max / 1000), lambda_max]``.

Example:
    >>> from optdiag.diagnosis.evidence import Evidence
    >>> from optdiag.diagnosis.stability import OptimizerSpec
    >>> ev = Evidence(step=0, lambda_max=150.0, optimizer=OptimizerSpec("sgd", lr=0.01))
    >>> s = suggest("oscillation", ev)[0]
    >>> s.target, round(s.proposed, 6)
    ('lr', 0.006667)
"""

from __future__ import annotations

import math

from optdiag.diagnosis.evidence import Evidence
from optdiag.diagnosis.stability import OptimizerSpec, max_stable_lr, stability_threshold
from optdiag.diagnosis.tuning import polyak_heavy_ball
from optdiag.diagnosis.types import KINDS, Suggestion
from optdiag.errors import UsageError

TARGET_RATIO = 0.5
DECAY_FACTOR = 0.5
MAX_LR_INCREASE = 10.0
BLIND_LR_DECREASE = 0.1
WARMUP_GROWTH_PER_STEP = 0.01
POLYAK_MAX_CONDITION = 1000.0
MOMENTUM_CANDIDATES = (0.9, 0.95, 0.99)
SMALL_BATCH = 32  # Masters & Luschi 2018: batches of 2-32 often train best
FAR_ABOVE_SMALL_BATCH = 2  # "far above" the small-batch range: at least twice its top
FREE_BATCH_SHARE = 0.25  # a batch up to B_simple / 4 needs at most 25% more examples than a tiny one

_SCHED = "torch.optim.lr_scheduler"


def _offer(target: str, action: str, current: float | None = None, proposed: float | None = None,
           reason: str = "", code: str | None = None) -> Suggestion | None:
    """A :class:`Suggestion`, or None when a number in it is not finite: extreme measurements (a sharpness of
    1e-300, a loss of inf) can make a computed lr or step overflow, and such advice is left out, never raised."""
    for value in (current, proposed):
        if value is not None and not math.isfinite(value):
            return None
    return Suggestion(target, action, current=current, proposed=proposed, reason=reason, code=code)


def _set(key: str, value: str) -> str:
    return f"for g in opt.param_groups: g[{key!r}] = {value}"


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"  # a reason may quote a number that was not measured


def _fmt_optional(x: float | None) -> str:
    return "?" if x is None else _g(x)


def _target_lr(ev: Evidence) -> float | None:
    """The lr putting the measured sharpness at ``TARGET_RATIO`` of the threshold (None if unknown)."""
    if ev.optimizer is None or ev.sharpness is None:
        return None
    limit = max_stable_lr(ev.optimizer, ev.sharpness)
    return None if limit is None or not limit > 0 else TARGET_RATIO * limit


def warmup_iters(start_factor: float) -> int:
    """Warmup length so that ``LinearLR`` grows the lr by 1% of its starting value per step.

    Example:
        >>> warmup_iters(0.1)
        900
    """
    if not 0 < start_factor <= 1:
        raise UsageError(f"start_factor must be in (0, 1], got {start_factor}")
    return max(1, math.ceil((1.0 - start_factor) / (start_factor * WARMUP_GROWTH_PER_STEP) - 1e-9))


def _warmup(action: str, current: float, proposed: float, start_lr: float, final_lr: float,
            why: str) -> Suggestion | None:
    """A ``LinearLR`` warmup from ``start_lr`` to the optimizer's lr ``final_lr`` (None when there is no finite
    ramp between them: an inverted one, or a start so small against the end that its length overflows)."""
    start = start_lr / final_lr if final_lr else math.nan
    if not 0 < start <= 1:
        return None
    try:
        iters = warmup_iters(start)
    except (OverflowError, ZeroDivisionError):
        return None
    return _offer(
        "schedule", action, current=current, proposed=proposed,
        reason=f"Set lr = {_g(final_lr)} and ramp up to it from {_g(start_lr)} over {iters} steps: {why}.",
        code=f"{_SCHED}.LinearLR(opt, start_factor={_g(start)}, total_iters={iters})")


def _lr_suggestion(action: str, ev: Evidence, proposed: float, reason: str) -> Suggestion | None:
    return _offer("lr", action, current=ev.lr, proposed=proposed, reason=reason,
                      code=_set("lr", _g(proposed)))


def _ratio_text(ev: Evidence) -> str:
    if ev.stability_ratio is None:  # "warming up" or why unknown, never a bare "?"
        return f"lambda_max = {_fmt_optional(ev.sharpness)}, {ev.stability_text} at lr {_fmt_optional(ev.lr)}"
    return (f"lambda_max = {_fmt_optional(ev.sharpness)} is {_fmt_optional(ev.stability_ratio)} of the "
            f"{ev.optimizer.kind} stability threshold {_fmt_optional(ev.stability_threshold)} at lr "
            f"{_fmt_optional(ev.lr)}")


def _batch_toward_b_simple(ev: Evidence, why: str) -> list[Suggestion | None]:
    b, b_simple = ev.batch_size, ev.b_simple
    if b is None or b_simple is None or not math.isfinite(b_simple) or b >= b_simple:
        return []
    proposed = 2 ** math.ceil(math.log2(b_simple))
    return [_offer("batch_size", "Increase the batch size", current=b, proposed=proposed,
                       reason=f"{why}: batch {b} is below the noise scale B_simple = tr(Sigma)/|G|^2 = "
                              f"{_g(b_simple)} (McCandlish et al. 2018).",
                       code=f"torch.utils.data.DataLoader(dataset, batch_size={proposed}, shuffle=True)")]


def _smaller_batch(b: int, why: str) -> Suggestion | None:
    """A quarter of the batch, not below :data:`SMALL_BATCH`: toward the range that often generalizes best."""
    proposed = max(SMALL_BATCH, b // 4)
    return _offer(
        "batch_size", "Use a smaller batch for a flatter minimum", current=b, proposed=proposed,
        reason=f"{why}: large batches land in sharp minima (Keskar et al. 2017), batches up to 32 often train "
               f"best (Masters & Luschi 2018).",
        code=f"torch.utils.data.DataLoader(dataset, batch_size={proposed}, shuffle=True)")


def batch_size_advice(batch_size: int | None, b_simple: float | None = None, *, gap_grows: bool = False,
                      sharpness_rises: bool = False, dataset_size: int | None = None) -> list[Suggestion]:
    """Batch-size advice from the generalization gap, the sharpness and the gradient noise scale (docs/triage.md).

    * **Lower it** when the generalization gap grows while the sharpness ``lambda_max`` rises with it and the
      batch is far above the range that often generalizes best (at least ``FAR_ABOVE_SMALL_BATCH`` times
      :data:`SMALL_BATCH`): a quarter of it, not below 32.
    * **Raising it is free** when the batch is far below the noise scale ``B_simple = tr(Sigma) / |G|^2``
      (McCandlish et al. 2018): training then needs about ``E_min (1 + B / B_simple)`` examples, the same at any
      batch well below ``B_simple``, in proportionally fewer steps. Proposed: the largest power of two up to
      ``B_simple / 4`` (at most 25% more examples), when it at least doubles the batch, within the dataset. Never
      while the gap grows (small batches generalize better).

    Example:
        >>> [s.proposed for s in batch_size_advice(8, b_simple=512.0)]
        [128.0]
        >>> [s.proposed for s in batch_size_advice(256, gap_grows=True, sharpness_rises=True)]
        [64.0]
    """
    if batch_size is None or batch_size < 1:
        return []
    if gap_grows:
        if sharpness_rises and batch_size >= FAR_ABOVE_SMALL_BATCH * SMALL_BATCH:
            why = f"The generalization gap grows while the sharpness rises, with batch {batch_size}"
            return [s for s in [_smaller_batch(batch_size, why)] if s is not None]
        return []
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        return []
    limit = b_simple * FREE_BATCH_SHARE
    if dataset_size:
        limit = min(limit, dataset_size)
    proposed = 2 ** math.floor(math.log2(limit)) if limit >= 1 else 0
    if proposed < 2 * batch_size:
        return []
    extra = (1.0 + proposed / b_simple) / (1.0 + batch_size / b_simple) - 1.0
    return [s for s in [_offer(
        "batch_size", "Raise the batch size: it is free", current=batch_size, proposed=proposed,
        reason=f"Batch {batch_size} is far below the noise scale B_simple = tr(Sigma)/|G|^2 = {_g(b_simple)}: "
               f"batch {proposed} needs about {extra:.0%} more examples and {proposed // batch_size}x fewer steps "
               f"(McCandlish et al. 2018).",
        code=f"torch.utils.data.DataLoader(dataset, batch_size={proposed}, shuffle=True)")] if s is not None]


def _oscillation(ev: Evidence) -> list[Suggestion | None]:
    out = []
    target = _target_lr(ev)
    if target is not None and ev.lr and target < ev.lr:
        out.append(_lr_suggestion(
            "Lower the learning rate", ev, target,
            f"{_ratio_text(ev)}; lr {_g(target)} puts it at {TARGET_RATIO} of the threshold (lr*lambda_max = 1 "
            f"for SGD), with margin because small batches are unstable earlier."))
    elif ev.lr:
        out.append(_lr_suggestion(
            "Halve the learning rate", ev, DECAY_FACTOR * ev.lr,
            f"Consecutive gradients are anti-aligned (cosine {_fmt_optional(ev.grad_cosine)}): the iterate "
            f"bounces at a loss floor; halve the step (Chee & Toulis 2018)."))
    out.append(_offer(
        "schedule", "Decay the learning rate when the loss stops improving", current=ev.lr,
        proposed=None if ev.lr is None else DECAY_FACTOR * ev.lr,
        reason="A bouncing iterate settles at a loss floor that shrinks with the lr: halving it there is the "
               "Chee & Toulis rule.",
        code=f"{_SCHED}.ReduceLROnPlateau(opt, factor={DECAY_FACTOR})"))
    out.append(_offer(
        "schedule", "Anneal the learning rate to zero over the run", current=ev.lr, proposed=None,
        reason="A decaying schedule lowers the noise-driven loss floor steadily instead of in steps.",
        code=f"{_SCHED}.CosineAnnealingLR(opt, T_max=trainer.estimated_stepping_batches)"))
    out += _batch_toward_b_simple(ev, "Gradient noise dominates")
    opt = ev.optimizer
    if opt is not None and opt.kind in ("adam", "adamw") and ev.sharpness is not None and ev.sharpness > 0 \
            and ev.lr:  # a negative sharpness needs no larger threshold (and X = -2 would divide by 0)
        # (2 + 2 b) / ((1 - b) lr) >= sharpness / TARGET_RATIO  <=>  b >= (X - 2) / (X + 2), X = lr sharpness / ratio
        x = ev.lr * ev.sharpness / TARGET_RATIO
        beta = (x - 2.0) / (x + 2.0)
        if opt.beta1 < beta < 0.999:
            out.append(_offer(
                "momentum", "Raise Adam's betas[0]", current=opt.beta1, proposed=beta,
                reason=f"Preconditioned {_ratio_text(ev)}; betas[0] = {_g(beta)} raises the threshold "
                       f"(2+2b)/((1-b) lr) to twice the sharpness.",
                code=_set("betas", f"({_g(beta)}, g['betas'][1])")))
    return out


def _saddle(ev: Evidence) -> list[Suggestion | None]:
    out = []
    opt = ev.optimizer
    if opt is not None and opt.kind in ("sgd", "heavy_ball", "nesterov", "adam", "adamw"):
        current = opt.beta1 if opt.kind in ("adam", "adamw") else opt.momentum
        for beta in MOMENTUM_CANDIDATES:
            if beta <= current:
                continue
            kind = {"sgd": "heavy_ball"}.get(opt.kind, opt.kind)
            trial = OptimizerSpec(kind, lr=opt.lr, momentum=0.0 if kind in ("adam", "adamw") else beta,
                                  beta1=beta if kind in ("adam", "adamw") else None, weight_decay=opt.weight_decay,
                                  dampening=opt.dampening if kind == "heavy_ball" else 0.0)
            threshold = stability_threshold(trial)
            if ev.sharpness is not None and threshold is not None and ev.sharpness > TARGET_RATIO * threshold:
                continue  # this much momentum would put the sharpness past the safe ratio (nesterov shrinks it)
            name = "betas[0]" if kind in ("adam", "adamw") else "momentum"
            code = _set("betas", f"({beta}, g['betas'][1])") if name == "betas[0]" else _set("momentum", str(beta))
            out.append(_offer(
                "momentum", f"Raise {name}", current=current, proposed=beta,
                reason=f"Negative curvature lambda_min = {_g(ev.lambda_min)}: momentum {beta} multiplies the step "
                       f"along the escape direction by up to {_g(1 / (1 - beta))} and keeps the sharpness within "
                       f"{TARGET_RATIO} of the threshold.",
                code=code))
            break
    if ev.lr:
        target = _target_lr(ev)
        proposed = 2.0 * ev.lr if target is None else min(2.0 * ev.lr, target)
        if proposed > ev.lr:
            out.append(_lr_suggestion(
                "Raise the learning rate", ev, proposed,
                f"The escape along lambda_min = {_g(ev.lambda_min)} grows like (1 + lr |lambda_min|) per step; "
                f"lr {_g(proposed)} speeds it up while keeping the sharpness within {TARGET_RATIO} of the "
                f"threshold."))
    if ev.batch_size is not None and ev.batch_size >= 4:
        proposed = ev.batch_size // 2
        out.append(_offer(
            "batch_size", "Halve the batch size", current=ev.batch_size, proposed=proposed,
            reason="SGD noise ~ lr/(B(1-beta)) (Smith & Le 2018): more noise kicks the iterate off the saddle.",
            code=f"torch.utils.data.DataLoader(dataset, batch_size={proposed}, shuffle=True)"))
    if ev.lambda_min is not None and ev.lambda_min < 0 and ev.loss:
        t = math.sqrt(2.0 * 0.01 * abs(ev.loss) / -ev.lambda_min)
        out.append(_offer(
            "schedule", "Take one step along the negative-curvature eigenvector", current=None, proposed=t,
            reason=f"Along its eigenvector u the loss changes by 1/2 lambda_min t^2 = {_g(0.5 * ev.lambda_min)} t^2: "
                   f"t = {_g(t)} lowers it by 1% (u from top_eigenvalues(op, which='SA')).",
            code=f"torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(model.parameters()) "
                 f"+ {_g(t)} * u, model.parameters())"))
    return out


def _plateau(ev: Evidence) -> list[Suggestion | None]:
    out = []
    opt = ev.optimizer
    if ev.lr:
        ratio = ev.stability_ratio
        factor = MAX_LR_INCREASE if not ratio else min(MAX_LR_INCREASE, TARGET_RATIO / ratio)
        if factor > 1:
            proposed = factor * ev.lr
            out.append(_lr_suggestion(
                "Raise the learning rate", ev, proposed,
                f"The step barely feels the curvature (stability ratio {_fmt_optional(ratio)}): lr "
                f"{_g(proposed)} is x{_g(factor)}, at most a decade and within {TARGET_RATIO} of the threshold."))
            out.append(_warmup("Warm up to the larger learning rate", ev.lr, proposed, ev.lr, proposed,
                               "so curvature can adapt on the way (Gilmer et al. 2021)"))
    if opt is None or not opt.preconditioned:
        out.append(_offer(
            "lr", "Switch to an adaptive optimizer", current=ev.lr, proposed=1e-3,
            reason="On a flat region per-parameter step sizes (Adam) rescale the tiny gradients directly.",
            code="opt = torch.optim.Adam(model.parameters(), lr=1e-3)"))
    return out


def _minimum(ev: Evidence) -> list[Suggestion | None]:
    out = []
    if ev.lr:
        out.append(_offer(
            "schedule", "Decay the learning rate to settle into the minimum", current=ev.lr,
            proposed=DECAY_FACTOR * ev.lr,
            reason="The gradient is ~0 with no negative curvature: a smaller step lowers the noise floor "
                   "(Chee & Toulis 2018).",
            code=f"{_SCHED}.ReduceLROnPlateau(opt, factor={DECAY_FACTOR})"))
    ratio, b = ev.stability_ratio, ev.batch_size
    if ratio is not None and ratio >= TARGET_RATIO and b is not None and b > SMALL_BATCH:
        out.append(_smaller_batch(b, f"Sharp minimum ({_ratio_text(ev)}) with batch {b}"))
    opt = ev.optimizer
    lam_max = ev.lambda_max
    # Polyak's pair is the fastest noise-free descent into this curvature range: a run for next time, and only for
    # full-batch steps (Evidence.noise_free). With minibatches its larger lr raises the noise floor the decay above
    # lowers (the verdict corpus's SGD minimum at batch 32: 0.339 against 0.241 on the full data), and its lr without
    # its momentum diverged where the momentum was 0.9 (docs/diagnosis-rules.md).
    if ev.noise_free and lam_max is not None and lam_max > 0 and (opt is None or not opt.preconditioned):
        # a measured lambda_min above lambda_max (Lanczos error) leaves the range [lambda_max, lambda_max]
        mu = min(max(ev.lambda_min if ev.lambda_min is not None else 0.0, lam_max / POLYAK_MAX_CONDITION), lam_max)
        if mu <= 0:  # lambda_max / 1000 underflowed: no range to tune for
            return out
        lr, beta, rate = polyak_heavy_ball(mu, lam_max)
        why = (f"Polyak's heavy-ball optimum for full-batch steps on curvature in [{_g(mu)}, {_g(lam_max)}] "
               f"converges at rate {_g(rate)} per step: lr {_g(lr)} and momentum {_g(beta)}, set together (either "
               f"alone can be unstable), reach such a minimum sooner next time.")
        both = f"for g in opt.param_groups: g['lr'], g['momentum'] = {_g(lr)}, {_g(beta)}"
        out.append(_offer("lr", "Set the Polyak learning rate", current=ev.lr, proposed=lr, reason=why, code=both))
        out.append(_offer("momentum", "Set the Polyak momentum",
                          current=None if opt is None else opt.momentum, proposed=beta, reason=why, code=both))
    return out


def _divergence(ev: Evidence) -> list[Suggestion | None]:
    out = []
    if not ev.lr:
        return out
    target = _target_lr(ev)
    if target is not None:
        safe = min(target, DECAY_FACTOR * ev.lr)
        why = f"{_ratio_text(ev)}; lr {_g(safe)} puts it at most at {TARGET_RATIO} of the threshold"
    else:
        safe = BLIND_LR_DECREASE * ev.lr
        why = "The loss diverged and the curvature is unknown: a decade lower is the safe first move (SASA)"
    out.append(_lr_suggestion("Lower the learning rate below the stability limit", ev, safe, why + "."))
    out.append(_warmup("Warm up from a stable learning rate", ev.lr, safe, safe, ev.lr,
                       "warmup lets curvature fall while the lr rises (Gilmer et al. 2021; Kalra & Barkeshli 2024)"))
    return out


def _loss_spike(ev: Evidence) -> list[Suggestion | None]:
    """Advice for *repeated* spikes only (one spike that recovers needs no change), and only where the measured
    curvature shows the step too large for it: the peak lr at ``TARGET_RATIO`` of the stability threshold and, for
    spikes early in training, a warmup over twice the latest spike's step (the lr was too large for the curvature
    until then; Gilmer et al. 2022). Without that measurement, or with the lr already within it, spikes that
    recover on their own get no advice: on the overhead benchmark's 670k-parameter MLP (six such spikes in 800
    steps, the curvature unmeasured) halving the lr, a warmup and clipping at twice the gradient norm each left as
    many spikes or more and the same or a worse final loss (docs/diagnosis-rules.md). Spikes that recur while the
    step bounces are the oscillation's, with its advice (:func:`~optdiag.diagnosis.diagnose_stall`).
    """
    target = _spike_lr(ev)
    if target is None:
        return []
    out: list[Suggestion | None] = []
    if ev.step <= WARMUP_SPIKES_BEFORE:
        iters = max(10, 10 * math.ceil(2 * ev.step / 10))
        # current and proposed stay None: a length in steps is no learning rate (the table shows them side by side)
        out.append(_offer(
            "schedule", f"Warm up the learning rate over {iters} steps",
            reason=f"{ev.spike_count} loss spikes, the latest ending at step {ev.step}, with {_ratio_text(ev)}: a "
                   f"linear warmup over {iters} steps (twice that) keeps the early steps below the curvature's limit "
                   f"(Gilmer et al. 2022).",
            code=f"{_SCHED}.LinearLR(opt, start_factor=0.1, total_iters={iters})"))
    out.append(_lr_suggestion("Lower the peak learning rate", ev, target,
                              f"{_ratio_text(ev)}; lr {_g(target)} puts it at {TARGET_RATIO} of the threshold."))
    return out


def _spike_lr(ev: Evidence) -> float | None:
    """The peak lr repeated spikes are advised (half the threshold of the measured sharpness), or None: not
    repeated, no lr, or the measured curvature does not show the step too large (unmeasured, or already within)."""
    target = _target_lr(ev)
    if (ev.spike_count or 0) < REPEATED_SPIKES or not ev.lr or target is None or target >= ev.lr:
        return None
    return target


def spike_advice_note(ev: Evidence) -> str:
    """Why a repeated spike got no advice ("" when it did, or is not repeated): the sentence a summary adds."""
    if (ev.spike_count or 0) < REPEATED_SPIKES or not ev.lr or _spike_lr(ev) is not None:
        return ""
    head = f" Spike {ev.spike_count} of the run; no change suggested: "
    if _target_lr(ev) is None:
        unknown = "the curvature at the spikes was not measured" if ev.sharpness is None else \
            f"the step's limit is unknown ({_ratio_text(ev)})"
        return head + (f"{unknown}, and without it a lower lr, a warmup or clipping is a guess that can make a run "
                       "whose spikes recover worse.")
    return head + f"{_ratio_text(ev)}: within the step's limit, so the spikes recover on their own."


#: Spikes from which on a run gets advice (one spike that recovers is reported, not acted on).
REPEATED_SPIKES = 2
#: Spikes up to this step are early-training spikes, which warmup removes.
WARMUP_SPIKES_BEFORE = 2000

_RULES = {"oscillation": _oscillation, "saddle_point": _saddle, "plateau": _plateau,
          "local_minimum": _minimum, "divergence": _divergence, "loss_spike": _loss_spike}


def suggest(kind: str, evidence: Evidence) -> list[Suggestion]:
    """The suggestions for a diagnosed ``kind``, numbers computed from ``evidence`` (most direct first).

    Args:
        kind: one of :data:`~optdiag.diagnosis.types.KINDS`.
        evidence: what was measured; suggestions needing an unmeasured number are left out.

    Example:
        >>> from optdiag.diagnosis.evidence import Evidence
        >>> full_batch = Evidence(step=0, lambda_max=100.0, lambda_min=1.0, grad_noise_trace=0.0)
        >>> [s.target for s in suggest("local_minimum", full_batch)]
        ['lr', 'momentum']
    """
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(evidence, Evidence):
        raise UsageError(f"expected an Evidence, got {type(evidence).__name__}")
    rule = _RULES.get(kind)
    return [] if rule is None else [s for s in rule(evidence) if s is not None]
