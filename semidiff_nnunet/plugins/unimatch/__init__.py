"""``unimatch``: UniMatch, Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised
Semantic Segmentation", CVPR 2023.

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="unimatch", trainer="semidiff_nnunet.plugins.unimatch.trainer:UniMatchTrainer",
                       summary="weak-view pseudo labels teach two CutMix strong views and a feature-dropout stream",
                       reference="Yang et al., CVPR 2023")]
