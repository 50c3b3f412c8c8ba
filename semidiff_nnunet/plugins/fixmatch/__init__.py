"""``fixmatch``: FixMatch, Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="fixmatch", trainer="semidiff_nnunet.plugins.fixmatch.trainer:FixMatchTrainer",
                       summary="confident weak-view pseudo labels supervise a strong photometric view",
                       reference="Sohn et al., NeurIPS 2020")]
