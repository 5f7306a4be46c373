"""A cheap task for the batch tests (a threshold), importable as a plugin by the batch's worker processes."""

import os

import numpy as np

from deepsegrecon.results import SegmentationResult, SegmentInfo
from deepsegrecon.task import InputSpec, Task, register

RUNS = []  # the source of every image this process ran


@register
class ThresholdTask(Task):
    name = "batch-test-threshold"
    inputs = (InputSpec("image", 3, True, "any image"),)
    uses_device = False

    def default_params(self):
        return {"threshold": 0.5}

    def run(self, images, params, ctx):
        img = images["image"]
        RUNS.append(img.meta.get("source"))
        ctx.step("threshold", 0.5)
        lab = (np.asarray(img.array) > float(params["threshold"])).astype(np.uint8)
        return SegmentationResult(img.with_array(lab), [SegmentInfo("bright", 1, (1.0, 0.5, 0.0), "")],
                                  report={"voxels": int(lab.sum()), "pid": os.getpid()})


@register
class SlowTask(ThresholdTask):
    """The threshold after ``seconds`` of steps (a case that takes a while, for cancel tests)."""

    name = "batch-test-slow"

    def default_params(self):
        return {"threshold": 0.5, "seconds": 1.0}

    def run(self, images, params, ctx):
        import time

        for n in range(10):
            ctx.step("waiting", n / 10)
            time.sleep(float(params["seconds"]) / 10)
        return super().run(images, params, ctx)
