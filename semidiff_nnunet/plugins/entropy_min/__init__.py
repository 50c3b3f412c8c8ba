"""``entropy-min``: entropy minimisation, Vu et al., "ADVENT", CVPR 2019 (the MinEnt variant).

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="entropy-min", trainer="semidiff_nnunet.plugins.entropy_min.trainer:EntropyMinTrainer",
                       summary="minimise the normalised prediction entropy on unlabeled patches",
                       reference="Vu et al., ADVENT, CVPR 2019")]
