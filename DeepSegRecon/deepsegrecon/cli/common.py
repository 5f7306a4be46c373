"""What every subcommand shares: the progress printer and the DICOM series option."""

from __future__ import annotations

import sys
import time


class ProgressPrinter:
    """Prints ``42% stage  ETA 12 s`` lines on stderr when the stage changes, every 5 %, or every 2 s."""

    def __init__(self, stream=None, every_pct: int = 5, every_s: float = 2.0):
        self.stream = stream if stream is not None else sys.stderr
        self.every_pct, self.every_s = every_pct, every_s
        self.last = (None, -100, 0.0)

    def __call__(self, event: dict) -> None:
        from ..progress import format_progress

        stage, pct, t = event.get("stage"), int(100 * (event.get("fraction") or 0)), time.monotonic()
        last_stage, last_pct, last_t = self.last
        if stage != last_stage or pct >= last_pct + self.every_pct or t - last_t >= self.every_s:
            print(format_progress(event), file=self.stream, flush=True)
            self.last = (stage, pct, t)


def add_series_option(p) -> None:
    p.add_argument("--series", action="append", metavar="UID", help="the DICOM series to read from an input folder "
                   "that holds several (repeat for several folders)")
