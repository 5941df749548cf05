"""Step-indexed schedules of the pretraining: learning rate, weight decay, teacher momentum, teacher temperature.

Every schedule is a pure function of the optimisation step (an int, 0-based), so resuming at step ``s``
reproduces the exact values of an uninterrupted run without storing any schedule state.

* learning rate: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``;
* weight decay: cosine from ``weight_decay`` to ``weight_decay_end`` over the whole run (DINO: 0.04 -> 0.2);
* teacher EMA momentum: cosine from 0.992 to 0.998 (the paper's settings) over the whole run;
* teacher temperature: linear warm-up 0.04 -> 0.07 over ``teacher_temp_warmup_steps``, then constant.
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and beyond)."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def linear(step: int, total_steps: int, start: float, end: float) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step ``total_steps`` and beyond)."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return start + t * (end - start)


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int,
                  warmup_start: float = 0.0) -> float:
    """Linear warm-up ``warmup_start -> peak`` over ``warmup_steps``, then cosine ``peak -> final``.

    The warm-up reaches ``peak`` at step ``warmup_steps``; the cosine spans the remaining
    ``total_steps - warmup_steps`` steps.
    """
    if step < warmup_steps:
        return linear(step, warmup_steps, warmup_start, peak)
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ``start -> end`` over ``warmup_steps``, then ``end`` (the teacher-temperature schedule)."""
    return linear(step, warmup_steps, start, end)
