"""``urpc``: uncertainty rectified pyramid consistency, Luo et al., "Semi-supervised medical image

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="urpc", trainer="semidiff_nnunet.plugins.urpc.trainer:URPCTrainer",
                       summary="uncertainty-rectified consistency across nnU-Net's deep-supervision pyramid",
                       reference="Luo et al., Medical Image Analysis 2022")]
