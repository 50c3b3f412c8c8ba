"""``protodiff``: prototype-anchored label diffusion that learns from noisy pseudo labels (Xi, Ma et al.,
DGM4MICCAI 2025, arXiv 2507.16429).

The method's trainer lives in :mod:`.trainer` (module docstring: defaults, sources, deviations, the
schedule), its network in :mod:`.networks` (planned encoder, visual-specific branches, label encoder,
latent projector, diffusion decoder, DDIM sampling inside ``forward``), its prototypes and losses
(eq. 2, 3) in :mod:`.prototypes`. This module only registers it, so that listing methods imports
neither torch nor nnU-Net.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="protodiff", trainer="semidiff_nnunet.plugins.protodiff.trainer:ProtoDiffTrainer",
                       summary="label diffusion with class prototypes as anchors against noisy pseudo labels",
                       reference="Xi et al., DGM4MICCAI 2025")]
