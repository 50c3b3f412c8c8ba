"""Strong photometric views of unlabeled patches for medical images (2D and 3D).

The unlabeled loader applies this pipeline to a copy of the *geometrically augmented* crop,
so the strong view shares its geometry with the weak one and a pseudo label computed on the
weak view is aligned voxel by voxel with the strong prediction (FixMatch, Sohn et al. 2020).

FixMatch's strong augmentation is RandAugment/CTAugment on natural RGB images (colour,
posterize, solarize, equalize, ... + Cutout). Most of those ops have no meaning on z-scored
CT/MR intensities, so this pipeline uses the intensity, blur and noise transforms nnU-Net
already trusts for medical images, widened and applied more often than in nnU-Net's weak
augmentation (nnU-Net: brightness/contrast ×[0.75, 1.25] p=0.15, gamma [0.7, 1.5] p=0.3,
blur σ [0.5, 1] p=0.2, noise variance ≤ 0.1 p=0.1). SSL4MIS's strong view
(``WeakStrongAugment``) is torchvision ``ColorJitter(0.8, 0.8, ...)``, i.e. brightness and
contrast factors in [0.2, 1.8] always applied; we keep its high application probability but
use the milder [0.5, 1.5] because z-scored images have no [0, 1] range to clip to.

Each entry: (transform, probability).

:func:`authors_strong_view` is the strong view of UniMatch's medical code (Yang et al., CVPR 2023,
``LiheYoung/UniMatch``, ``more-scenarios/medical/dataset/acdc.py``): with probability 0.8
``ColorJitter(0.5, 0.5, 0.5, 0.25)`` — on a grey image only brightness and contrast act, both
factors in [0.5, 1.5], applied together — then with probability 0.5 a Gaussian blur with σ ∈
[0.1, 2] (``dataset/transform.py`` ``blur``). No gamma and no noise unless asked for.
"""

from __future__ import annotations

from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform


def authors_strong_view(brightness_contrast: tuple[float, float] = (0.5, 1.5), p: float = 0.8,
                        blur_sigma: tuple[float, float] = (0.1, 2.0), p_blur: float = 0.5,
                        p_gamma: float = 0.0, p_noise: float = 0.0) -> ComposeTransforms:
    """UniMatch's medical strong view on image tensors (C, *spatial), 2D or 3D.

    With probability ``p`` one draw applies brightness *and* contrast (factors uniform in
    ``brightness_contrast``; torchvision's ColorJitter on a grey image, whose op order does not
    matter for these two linear maps); then with probability ``p_blur`` a Gaussian blur of σ uniform
    in ``blur_sigma`` (voxels). ``p_gamma`` / ``p_noise`` (default 0: off, as the authors) add
    :func:`medical_strong_view`'s gamma and noise ops.
    """
    lo, hi = brightness_contrast
    ops = [RandomTransform(ComposeTransforms([
        MultiplicativeBrightnessTransform(multiplier_range=BGContrast((lo, hi)), synchronize_channels=False,
                                          p_per_channel=1),
        ContrastTransform(contrast_range=BGContrast((lo, hi)), preserve_range=True, synchronize_channels=False,
                          p_per_channel=1)]), apply_probability=p)]
    if p_gamma > 0:
        ops.append(RandomTransform(GammaTransform(
            gamma=BGContrast((0.5, 2.0)), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
            p_retain_stats=1), apply_probability=p_gamma))
    ops.append(RandomTransform(GaussianBlurTransform(
        blur_sigma=tuple(blur_sigma), synchronize_channels=False, synchronize_axes=True, p_per_channel=1,
        benchmark=False), apply_probability=p_blur))
    if p_noise > 0:
        ops.append(RandomTransform(GaussianNoiseTransform(
            noise_variance=(0, 0.2), p_per_channel=1, synchronize_channels=True), apply_probability=p_noise))
    return ComposeTransforms(ops)


def medical_strong_view(strength: float = 1.0, p: float = 0.8, p_other: float = 0.5) -> ComposeTransforms:
    """Brightness, contrast, gamma, Gaussian blur and Gaussian noise on image tensors (C, *spatial).

    ``strength`` scales every range (1.0: brightness/contrast ×[0.5, 1.5], gamma [0.5, 2],
    blur σ [0.5, 1.5], noise variance ≤ 0.2); ``p`` is the probability of the brightness and
    contrast ops, ``p_other`` that of gamma, blur and noise.
    """
    s = float(strength)
    lo, hi = max(1 - 0.5 * s, 0.05), 1 + 0.5 * s
    p2 = p_other
    return ComposeTransforms([
        RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast((lo, hi)), synchronize_channels=False, p_per_channel=1), apply_probability=p),
        RandomTransform(ContrastTransform(
            contrast_range=BGContrast((lo, hi)), preserve_range=True, synchronize_channels=False, p_per_channel=1),
            apply_probability=p),
        RandomTransform(GammaTransform(
            gamma=BGContrast((max(1 - 0.5 * s, 0.1), 1 + s)), p_invert_image=0, synchronize_channels=False,
            p_per_channel=1, p_retain_stats=1), apply_probability=p2),
        RandomTransform(GaussianBlurTransform(
            blur_sigma=(0.5 * s, 1.5 * s), synchronize_channels=False, synchronize_axes=False, p_per_channel=1,
            benchmark=False), apply_probability=p2),
        RandomTransform(GaussianNoiseTransform(
            noise_variance=(0, 0.2 * s), p_per_channel=1, synchronize_channels=True), apply_probability=p2),
    ])
