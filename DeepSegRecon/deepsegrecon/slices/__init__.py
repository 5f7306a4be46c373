"""Slice segmentation of CT with TransUNet: abdominal organs (or any label set), slice by slice."""

from ..capability import Capability

CAPABILITY = Capability("slices", tasks=("slices",), recipes={"slices": "training:recipe"},
                        batch_adapters={"slices": "batch:SlicesAdapter"},
                        params={"slices": "params:SliceParams"})
