"""Slice segmentation of CT with TransUNet: abdominal organs (or any label set), slice by slice."""
