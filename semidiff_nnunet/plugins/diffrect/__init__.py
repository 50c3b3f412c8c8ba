"""``diffrect``: Liu et al., "DiffRect: Latent Diffusion Label Rectification for Semi-supervised
Medical Image Segmentation", MICCAI 2024. The method is in :mod:`.trainer` (module docstring:
defaults, sources, deviations), its rectification network in :mod:`.networks`, the latent
diffusion in :mod:`.rectification`, its losses in :mod:`.losses`. This module only registers them,
so that listing methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import DiffusionHeadSpec, LossSpec, MethodSpec, NetworkSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")

REFERENCE = "Liu et al., MICCAI 2024"
_PKG = "semidiff_nnunet.plugins.diffrect"


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="diffrect", trainer=f"{_PKG}.trainer:DiffRectTrainer",
                       summary="latent-diffusion rectification of colour-coded pseudo labels (LCC + LFR)",
                       reference=REFERENCE)]


@hookimpl
def semidiff_register_networks():
    return [NetworkSpec(name="diffrect-rectifier", factory=f"{_PKG}.networks:rectification_net_from_plans",
                        summary="DiffRect rectification model (B_sem + latent denoiser + decoder) from nnU-Net plans",
                        reference=REFERENCE)]


@hookimpl
def semidiff_register_diffusion_heads():
    return [DiffusionHeadSpec(name="diffrect-lfr", factory=f"{_PKG}.rectification:latent_diffusion_head",
                              summary="DiffRect LFR: latent denoising U-Net, T=10 cosine, x0-prediction, DDIM 2 steps",
                              reference=REFERENCE)]


@hookimpl
def semidiff_register_losses():
    return [
        LossSpec(name="diffrect-ce-dice", factory=f"{_PKG}.losses:ce_dice_factory",
                 summary="CE + SSL4MIS Dice (background included) on hard (pseudo) labels", reference=REFERENCE),
        LossSpec(name="diffrect-complementary", factory=f"{_PKG}.losses:complementary_loss_factory",
                 summary="complementary CE(1 - p_strong, argmin p_weak) with its entropy weight", reference=REFERENCE),
        LossSpec(name="diffrect-calibration-guidance", factory=f"{_PKG}.losses:calibration_guidance_factory",
                 summary="calibration guidance 999·(1 - Dice) between two label maps (eq. 6)", reference=REFERENCE),
    ]
