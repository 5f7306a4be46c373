"""Progress events of a running task: the fraction weighted over the task's stages, elapsed time and ETA, and the
one-line text the CLI prints."""

from __future__ import annotations

import time
from collections.abc import Callable


class ProgressReporter:
    """``reporter(stage, fraction, message, extra=None)`` -> event dict (also passed to ``sink``), with an ETA.

    ``extra``: optional task-specific fields added to the event (e.g. ``epoch``, ``loss``, ``val_dice`` of a
    training job); they cannot replace the standard fields.

    With ``stages`` ({name: weight}) the fraction is within the stage; without, it is overall.
    The overall fraction never goes backwards; an unknown stage keeps the fraction reached so far.
    """

    def __init__(self, stages: dict | None = None, sink: Callable[[dict], None] | None = None):
        total = float(sum(stages.values())) if stages else 0.0
        self.weights = {k: v / total for k, v in stages.items()} if total > 0 else None
        self.sink = sink
        self.start = time.monotonic()
        self.done = 0.0
        self.last: dict = {"stage": None, "fraction": 0.0, "elapsed_s": 0.0, "eta_s": None, "message": ""}

    def __call__(self, stage: str, fraction: float = 0.0, message: str = "", extra: dict | None = None) -> dict:
        f = min(max(float(fraction or 0.0), 0.0), 1.0)
        if self.weights is None:
            done = f
        elif stage in self.weights:
            done = 0.0
            for name, w in self.weights.items():
                if name == stage:
                    done += w * f
                    break
                done += w
        else:
            done = self.done
        self.done = max(self.done, done)
        elapsed = time.monotonic() - self.start
        eta = elapsed * (1 - self.done) / self.done if self.done > 0.02 else None
        event = {"stage": stage, "fraction": round(self.done, 4), "elapsed_s": round(elapsed, 2),
                 "eta_s": None if eta is None else round(eta, 1), "message": message or ""}
        if extra:  # task-specific fields (training: epoch, loss, val_dice ...); never the standard ones
            event.update({k: v for k, v in extra.items() if k not in event and k != "state"})
        self.last = event
        if self.sink is not None:
            self.sink(event)
        return event


def format_progress(event: dict) -> str:
    """One human line: `` 42% segmenting  ETA 12 s``."""
    pct = f"{100 * (event.get('fraction') or 0):3.0f}%"
    eta = event.get("eta_s")
    eta = "" if eta is None else f"  ETA {format_duration(eta)}"
    msg = f"  {event['message']}" if event.get("message") else ""
    return f"{pct} {event.get('stage') or ''}{eta}{msg}"


def format_duration(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"
