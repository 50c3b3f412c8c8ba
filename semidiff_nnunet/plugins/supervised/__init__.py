"""``supervised``: nnU-Net trained on the labeled cases only — the baseline every table needs.

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="supervised", trainer="semidiff_nnunet.plugins.supervised.trainer:SupervisedTrainer",
                       summary="nnU-Net on the labeled cases only (lower bound)",
                       reference="Isensee et al., nnU-Net, Nature Methods 2021")]
