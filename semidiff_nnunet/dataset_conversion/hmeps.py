"""``hmeps``: HMEPS through the generic converter.

HMEPS's original layout is not public; the only known form is Ciampi et al.'s
``{train,val}/{image,mask}`` (3-channel images, grayscale stored as RGB, binary masks). The
generic converter reads that layout (and plain ``images/`` + ``masks/``); images stay 3-channel.
"""

from __future__ import annotations

from pathlib import Path

from semidiff_nnunet.dataset_conversion import generic


def convert(source: Path, target: Path, *, images: str | None = None, masks: str | None = None,
            mask_suffix: str | None = None, threshold: int | str | None = None, channels: str = "rgb",
            num_processes: int | None = None) -> dict:
    return generic.convert(source, target, images=images, masks=masks, mask_suffix=mask_suffix, threshold=threshold,
                           channels=channels, num_processes=num_processes, _converter="hmeps", _dataset_name="HMEPS")
