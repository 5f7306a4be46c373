"""Segment Teeth: dental CBCT -> one segment per tooth (FDI 11-48), maxilla and mandible.

Modules: ``labels`` (FDI conventions, names, colours, terminology), ``phantom`` (synthetic jaw CBCT
with ground truth), ``nets`` (the two MONAI U-Nets), ``postprocess`` (instance split and FDI
numbering), ``task`` (the registered ``teeth`` task) and ``train`` (training on phantoms, evaluation).
"""

from ..capability import Capability

CAPABILITY = Capability("teeth", tasks=("teeth",), recipes={"teeth": "training:recipe"},
                        batch_adapters={"teeth": "batch:TeethAdapter"})
