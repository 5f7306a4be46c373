"""Brain tumour segmentation: SegResNet + VAE (Myronenko 2018) on T1, T1c, T2 and FLAIR."""

from ..capability import Capability

CAPABILITY = Capability("brain", tasks=("brain-tumor",), recipes={"brain-tumor": "training:recipe"},
                        batch_adapters={"brain-tumor": "batch:BrainAdapter"},
                        region_label_hooks={"brain-tumor": "labels:regions_to_label"},
                        params={"brain-tumor": "params:BrainParams"})
