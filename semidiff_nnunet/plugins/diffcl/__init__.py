"""``diffcl``: Guo et al., "Diff-CL: A Novel Cross Pseudo-Supervision Method for Semi-supervised
Medical Image Segmentation", arXiv 2503.09408 (2025). The method is in :mod:`.trainer` (module
docstring: defaults, sources, deviations), its networks in :mod:`.networks`, :mod:`.hf_mamba` and
:mod:`.mamba`, its losses in :mod:`.losses`. This module only registers them, so that listing
methods imports neither torch nor nnU-Net.
"""

from semidiff_nnunet import DiffusionHeadSpec, LossSpec, MethodSpec, NetworkSpec, hookimpl
from semidiff_nnunet.specs import lazy_module_getattr

__getattr__ = lazy_module_getattr(__name__, ".trainer")

_PKG = "semidiff_nnunet.plugins.diffcl"
REFERENCE = "Guo et al., arXiv 2503.09408 (2025)"


@hookimpl
def semidiff_register_methods():
    return [MethodSpec(name="diffcl", trainer=f"{_PKG}.trainer:DiffCLTrainer",
                       summary="diffusion (DS) and HF-Mamba CNN (CS) teach each other; contrastive label propagation",
                       reference=REFERENCE)]


@hookimpl
def semidiff_register_networks():
    ref = "Guo et al. 2025 (Diff-CL); Xing et al., MICCAI 2024 (SegMamba)"
    return [NetworkSpec("hf-mamba", f"{_PKG}.hf_mamba:HFMamba",
                        "FFT high-pass, spatial attention, tri-orientated Mamba, MLP (eq. 10)", ref),
            NetworkSpec("tri-oriented-mamba", f"{_PKG}.mamba:TriOrientedMamba",
                        "Mamba with forward, backward and inter-slice scans (pure PyTorch or mamba-ssm)", ref),
            NetworkSpec("diffcl-cs", f"{_PKG}.trainer:cs_network_factory",
                        "the planned nnU-Net network with HF-Mamba inserted", ref),
            NetworkSpec("diffcl-ds", f"{_PKG}.networks:TimestepConditionedUNet",
                        "a planned U-Net conditioned on the diffusion time", ref)]


@hookimpl
def semidiff_register_diffusion_heads():
    return [DiffusionHeadSpec("diffcl-label-diffusion", f"{_PKG}.networks:LabelDiffusion",
                              "DS network on image ⊕ noisy one-hot label (eq. 5), continuous cosine γ(t)",
                              "Guo et al. 2025 (Diff-CL)")]


@hookimpl
def semidiff_register_losses():
    ref = "Guo et al. 2025 (Diff-CL)"
    return [LossSpec("diffcl-cps", f"{_PKG}.losses:cps_factory", "DS-CS cross pseudo supervision, Dice + λ·CE (eq. 6-9)", ref),
            LossSpec("diffcl-dice-ce", f"{_PKG}.losses:dice_ce_factory", "Dice + w·CE (eq. 8-9)", ref),
            LossSpec("diffcl-label-propagation", f"{_PKG}.losses:label_propagation_factory",
                     "top-k contrastive label propagation against a memory bank (eq. 11-15)", ref)]
