"""Outlier detection for -sl / -sg: llm.c's llmc/outlier_detector.h and its use in train_gpt2.cu.

Each step's loss and gradient norm go into their own window of the last 128 values. Until a window
is full its z-score is NaN (nothing is skipped); from the 129th value on, z = (value - mean) / std
over the window that includes the new value (population std; 0 when std is 0). The sums are kept
in float64 and updated with += and -=, as llm.c. With -sl Z (-sg Z), a step whose loss (grad-norm)
z-score exceeds Z skips its optimizer update; the value still enters the window, as in llm.c.

nanollm's additions: a non-finite value never enters a window (one NaN would poison llm.c's sums,
and every later z-score, for good), and with -sl (-sg) on, a non-finite loss (norm) skips the
update too; with both off a non-finite loss stops training, as before. As in llm.c, the windows
are not saved in checkpoints: after -y 1 they fill again from empty.
"""

import math

WINDOW = 128  # llm.c's OUTLIER_DETECTOR_WINDOW_SIZE


class OutlierDetector:
    def __init__(self, window=WINDOW):
        self.window = window
        self.buffer = [0.0] * window
        self.count = 0
        self.index = 0
        self.sum = 0.0
        self.sum_sq = 0.0

    def update(self, value):
        """Add value; return its z-score over the window (NaN while the window fills)."""
        value = float(value)
        if not math.isfinite(value):
            return math.nan
        if self.count < self.window:
            self.buffer[self.count] = value
            self.sum += value
            self.sum_sq += value * value
            self.count += 1
            return math.nan
        old = self.buffer[self.index]
        self.sum -= old
        self.sum_sq -= old * old
        self.buffer[self.index] = value
        self.sum += value
        self.sum_sq += value * value
        self.index = (self.index + 1) % self.window
        mean = self.sum / self.window
        variance = self.sum_sq / self.window - mean * mean
        if variance < 0:  # rounding of the running sums; C's sqrt gives NaN here
            return math.nan
        std = math.sqrt(variance)
        return 0.0 if std == 0.0 else (value - mean) / std


def skip_reason(loss, zloss, norm, zgrad, lossz_limit, gradz_limit):
    """Why this step's update is skipped (the text after "skipping update due to "), or None.
    Limits of 0 are off. The loss is checked first, as llm.c."""
    if lossz_limit != 0 and not math.isfinite(loss):
        return f"a non-finite loss ({loss})"
    if lossz_limit != 0 and math.isfinite(zloss) and zloss > lossz_limit:
        return f"loss z-score of {zloss:f}"
    if gradz_limit != 0 and not math.isfinite(norm):
        return f"a non-finite grad norm ({norm})"
    if gradz_limit != 0 and math.isfinite(zgrad) and zgrad > gradz_limit:
        return f"grad z-score of {zgrad:f}"
    return None
