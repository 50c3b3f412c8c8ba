"""``superdiffusion``: diffusion teacher pretraining, then teacher–student co-training (Ciampi, Lagani,
Amato, Falchi 2025).

The method is in :mod:`.trainer` (module docstring: defaults with their sources, deviations, the
schedule), its two pathways and the inference module in :mod:`.networks` (built on the shared
:mod:`semidiff_nnunet.networks.timestep_unet`). Phase ``pretrain`` trains the teacher's mask and
image pathways label-free by cycle consistency; phase ``cotrain`` trains teacher and student with
CPS, nnU-Net's supervised loss and R rounds of diffusion. This module only registers the method, so
that listing methods imports neither torch nor nnU-Net.
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
