"""Sparse-view CBCT reconstruction: DIF-Gaussian and a U-Net refiner beside FDK and iterative methods."""

from ..capability import Capability

CAPABILITY = Capability("cbct", tasks=("cbct-recon",), batch_adapters={"cbct-recon": "batch:CbctAdapter"},
                        params={"cbct-recon": "params:ReconParams"})
