"""``ph2``: PH2 dermoscopy (skin lesion, binary).

Source: ``PH2Dataset/PH2 Dataset images/IMDxxx/{IMDxxx_Dermoscopic_Image/IMDxxx.bmp,
IMDxxx_lesion/IMDxxx_lesion.bmp, IMDxxx_roi/...}``; SOURCE may be the folder holding
``PH2Dataset``, ``PH2Dataset`` itself or ``PH2 Dataset images``. Lesion masks are 1-bit BMPs
(some RGB 0/255, e.g. IMD002) and are read exactly; a ``.jpg`` copy of a mask is ignored.
There is no official split: every case goes to imagesTr.
"""

from __future__ import annotations

from pathlib import Path

from semidiff_nnunet.dataset_conversion.common import (
    RGB_CHANNELS,
    ConversionError,
    DatasetWriter,
    convert_case_2d,
    find_dir,
    log,
    run_jobs,
)


def find_root(source: Path) -> Path:
    root = find_dir(source, "PH2 Dataset images", max_depth=3)
    if root is None:
        raise ConversionError(f"{source} holds no 'PH2 Dataset images' folder; expected the PH2 download "
                              f"(PH2Dataset/PH2 Dataset images/IMDxxx/...).")
    return root


def convert(source: Path, target: Path, *, num_processes: int | None = None) -> dict:
    root = find_root(Path(source))
    case_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.upper().startswith("IMD"))
    if not case_dirs:
        raise ConversionError(f"{root} holds no IMDxxx folders; expected one folder per PH2 case.")
    w = DatasetWriter(target, ".png")
    w.make_dirs("train")
    jobs = []
    for d in case_dirs:
        case = d.name
        image = d / f"{case}_Dermoscopic_Image" / f"{case}.bmp"
        mask = d / f"{case}_lesion" / f"{case}_lesion.bmp"
        for p, what in ((image, "the dermoscopic image"), (mask, "the lesion mask")):
            if not p.is_file():
                raise ConversionError(f"{p} is missing; expected {what} of PH2 case {case} as BMP.")
        jobs.append(dict(image=str(image), out_image=str(w.image("train", case)), masks=[str(mask)],
                         out_label=str(w.label("train", case)), channels="rgb", mode="binary", allowed=(0, 1)))
    log.info("ph2: %d cases in %s", len(jobs), root)
    run_jobs(convert_case_2d, jobs, num_processes=num_processes, description="ph2: converting")
    return w.finish(converter="ph2", channel_names=RGB_CHANNELS, labels={"background": 0, "lesion": 1},
                    dataset_name="PH2", source_form="PH2 download (BMP)",
                    reference="Mendonca et al., PH2 - a dermoscopic image database, EMBC 2013",
                    description="PH2 dermoscopic images with binary lesion masks")
