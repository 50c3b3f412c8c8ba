"""``bcp``: bidirectional copy-paste, Bai et al., "Bidirectional Copy-Paste for Semi-Supervised
Medical Image Segmentation", CVPR 2023.

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="bcp", trainer="semidiff_nnunet.plugins.bcp.trainer:BCPTrainer",
                       summary="labeled and unlabeled patches copy-pasted both ways, mean-teacher pseudo labels",
                       reference="Bai et al., CVPR 2023")]
