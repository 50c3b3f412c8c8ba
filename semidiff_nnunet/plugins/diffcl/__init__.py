"""``diffcl``: Guo et al., "Diff-CL: A Novel Cross Pseudo-Supervision Method for Semi-supervised
Medical Image Segmentation", arXiv 2503.09408 (2025). The method is in :mod:`.trainer` (module
docstring: defaults, sources, deviations), its networks in :mod:`.networks`, :mod:`.hf_mamba` and
:mod:`.mamba`, its losses in :mod:`.losses`. This module only registers the method, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")

_PKG = "semidiff_nnunet.plugins.diffcl"
REFERENCE = "Guo et al., arXiv 2503.09408 (2025)"


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="diffcl", trainer=f"{_PKG}.trainer:DiffCLTrainer",
                       summary="diffusion (DS) and HF-Mamba CNN (CS) teach each other; contrastive label propagation",
                       reference=REFERENCE)]

