"""Segment Teeth: dental CBCT -> one segment per tooth (FDI 11-48), maxilla and mandible.

Modules: ``task`` (the registered ``teeth`` task; its parameters in ``params``), ``nets`` (the two MONAI
U-Nets), ``postprocess`` and ``numbering`` (instance split, FDI numbering), ``refine`` (surfaces), ``plausible``
(the gate that says "no teeth"), ``labels`` (FDI conventions, names, colours, terminology), ``batch`` and ``cli``;
``evaluate`` (accuracy on labelmaps and held-out phantoms); ``training`` (the fine-tuning recipe) and ``samples``
(training arrays and patches); the tools that reproduce the shipped weights, ``train`` and ``train_head``, over the
phantom generators ``phantom`` (jaws) and ``head`` (heads).
"""

from ..capability import Capability

CAPABILITY = Capability("teeth", tasks=("teeth",), recipes={"teeth": "training:recipe"},
                        batch_adapters={"teeth": "batch:TeethAdapter"},
                        params={"teeth": "params:TeethParams"})
