"""``superdiffusion``: diffusion teacher pretraining, then teacher–student co-training (Ciampi, Lagani,
Amato, Falchi).

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="superdiffusion",
                       trainer="semidiff_nnunet.plugins.superdiffusion.trainer:SuperDiffusionTrainer",
                       summary="label-free two-pathway diffusion teacher, then teacher-student co-training",
                       reference="Ciampi et al. 2025")]
