"""semidiff-nnunet: semi-supervised (diffusion-based) segmentation methods as plugins on nnU-Net v2.

Public API for plugin authors (import from here, not from submodules)::

    from semidiff_nnunet import hookimpl, MethodSpec, ConverterSpec
    from semidiff_nnunet.training import SemiSupervisedTrainer, ramps, EMA

The training symbols import torch and nnU-Net; they live in ``semidiff_nnunet.training`` so that
importing this package (and listing plugins) stays light.
"""

from semidiff_nnunet.hookspecs import hookimpl, hookspec
from semidiff_nnunet.specs import ConverterSpec, MethodSpec

__version__ = "0.1.0"

__all__ = [
    "hookimpl",
    "hookspec",
    "ConverterSpec",
    "MethodSpec",
    "__version__",
]
