"""``semigda``: a frozen Stable-Diffusion VAE as a second view, dual-distribution alignment (Huang et al.,
CVPR 2026, arXiv 2604.23274). Needs the optional extra ``pip install -e ".[semigda]"`` (diffusers) and
the Stable Diffusion VAE weights from a local path (``--set vae=PATH``: a diffusers AutoencoderKL
folder, a ``.safetensors`` file or the authors' LDM ``.ckpt``; nothing is downloaded). 2D only.

The method's trainer lives in :mod:`.trainer`; this module only registers it, so that listing
methods imports neither torch, nnU-Net nor diffusers.
"""

from semidiff_nnunet import MethodSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="semigda", trainer="semidiff_nnunet.plugins.semigda.trainer:SemiGDATrainer",
                       summary="frozen SD-VAE latent branch and a CNN branch aligned in one latent space (2D)",
                       reference="Huang et al., CVPR 2026")]
