"""``diffrect``: Liu et al., "DiffRect: Latent Diffusion Label Rectification for Semi-supervised
Medical Image Segmentation", MICCAI 2024. The method is in :mod:`.trainer` (module docstring:
defaults, sources, deviations), its rectification network in :mod:`.networks`, the latent
diffusion in :mod:`.rectification`, its losses in :mod:`.losses`. This module only registers the method,
so that listing methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")

REFERENCE = "Liu et al., MICCAI 2024"
_PKG = "semidiff_nnunet.plugins.diffrect"


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="diffrect", trainer=f"{_PKG}.trainer:DiffRectTrainer",
                       summary="latent-diffusion rectification of colour-coded pseudo labels (LCC + LFR)",
                       reference=REFERENCE)]

