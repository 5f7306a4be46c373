"""X-ray <-> CT registration (DiffPose recipe on DiffDRR).

Modules: ``geometry`` (C-arm, poses and their parameterisations, frames), ``ct`` (CT -> DiffDRR renderer,
landmarks), ``xrayio`` (reading and preprocessing radiographs), ``metrics`` (multiscale NCC, geodesics, mTRE),
``regressor`` (patient-specific ResNet-18 pose regressor and its training), ``refine`` (test-time
refinement), ``task`` (the registered ``xray-register`` and ``drr`` tasks) and ``params`` (their parameters).
"""

from ..capability import Capability

CAPABILITY = Capability("xray", tasks=("xray-register", "drr"),
                        batch_adapters={"xray-register": "batch:XrayAdapter"},
                        params={"xray-register": "params:RegisterParams", "drr": "params:DrrParams"})
