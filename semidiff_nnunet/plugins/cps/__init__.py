"""``cps``: cross pseudo supervision, Chen et al., "Semi-Supervised Semantic Segmentation with

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="cps", trainer="semidiff_nnunet.plugins.cps.trainer:CPSTrainer",
                       summary="two differently initialised networks teach each other with hard pseudo labels",
                       reference="Chen et al., CVPR 2021")]
