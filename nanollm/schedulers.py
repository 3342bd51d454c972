"""Learning-rate schedules with llm.c's names and meanings (llmc/schedulers.h).

All warm up linearly over `warmup` steps (step counts from 0, so the first step's rate is
lr/warmup), then: cosine and linear decay to lr * final_frac at the last step; constant holds;
wsd ("warmup-stable-decay") holds until 80% of training, then decays as 1 - sqrt to the final
fraction (https://arxiv.org/abs/2405.18392).
"""

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def learning_rate(schedule, step, lr, warmup, total_steps, final_frac):
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if schedule == "wsd":
        decay_start = int(0.8 * total_steps)
        if step < decay_start:
            return lr
        ratio = _clamp((step - decay_start) / max(total_steps - decay_start, 1))
        return min_lr + (1.0 - math.sqrt(ratio)) * (lr - min_lr)
    ratio = _clamp((step - warmup) / max(total_steps - warmup, 1))
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
    return lr - ratio * (lr - min_lr)  # linear


def _clamp(x):
    return min(max(x, 0.0), 1.0)
