"""``uamt``: uncertainty-aware mean teacher, Yu et al., "Uncertainty-aware Self-ensembling Model

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="uamt", trainer="semidiff_nnunet.plugins.uamt.trainer:UAMTTrainer",
                       summary="mean teacher with entropy-thresholded consistency (noisy teacher passes)",
                       reference="Yu et al., MICCAI 2019")]
