"""The load the coordinator sees: a rolling window of booking requests -> WorkloadProfile.

Every booking request (served, queued or refused: the offered load, which is what a plan is
made for) adds (time, input tokens, output tokens). The profile's rate is the number of
requests in the last ``window_s`` over the window (or over the time since the first sample,
while the window is still filling); its lengths are the samples' statistics. Bounded memory:
at most ``max_samples`` are kept (the oldest dropped first), so a burst of more than that in
one window estimates the rate from the kept samples' time span.

Per process: each coordinator replica measures the bookings it answers.
"""

from __future__ import annotations

import threading
from collections import deque

from app.allocation.workload import WorkloadProfile

DEFAULT_WINDOW_S = 300.0
DEFAULT_MAX_SAMPLES = 10_000
# Fewer samples than this say too little about the load: no profile.
MIN_SAMPLES = 10


class WorkloadWindow:
    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, not {window_s}")
        if max_samples < 1 or min_samples < 1:
            raise ValueError("max_samples and min_samples: must be at least 1")
        self.window_s = window_s
        self.min_samples = min_samples
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=max_samples)
        self._started: float | None = None
        self._lock = threading.Lock()

    def add(self, now: float, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            if self._started is None:
                self._started = now
            self._samples.append((now, input_tokens, output_tokens))

    def profile(self, now: float) -> WorkloadProfile | None:
        """The profile of the last ``window_s``; None with fewer than ``min_samples``."""
        with self._lock:
            horizon = now - self.window_s
            while self._samples and self._samples[0][0] <= horizon:
                self._samples.popleft()
            samples = list(self._samples)
            started = self._started
        if len(samples) < self.min_samples or started is None:
            return None
        full = len(samples) == self._samples.maxlen
        # The span the samples cover: the whole window once it has filled (or since the
        # first sample); the kept samples' own span when the bound dropped some.
        begin = samples[0][0] if full else max(horizon, started)
        span = now - begin
        if span <= 0:
            return None
        rate = len(samples) / span
        return WorkloadProfile.from_samples(rate, [s[1] for s in samples], [s[2] for s in samples])
