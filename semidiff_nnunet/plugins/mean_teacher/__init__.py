"""``mean-teacher``: Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017.

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="mean-teacher", trainer="semidiff_nnunet.plugins.mean_teacher.trainer:MeanTeacherTrainer",
                       summary="EMA teacher, softmax-MSE consistency, sigmoid ramp-up",
                       reference="Tarvainen & Valpola, NeurIPS 2017")]
