"""Built-in plugin: the dataset converters (``semidiff convert NAME SOURCE``).

Imports stay light: each converter's module (numpy, SimpleITK, PIL, h5py, nnU-Net) is imported
only when the converter runs or its signature is inspected.
"""

from __future__ import annotations

import importlib
import inspect

from semidiff_nnunet.hookspecs import hookimpl
from semidiff_nnunet.specs import ConverterSpec

_PKG = "semidiff_nnunet.dataset_conversion"


class LazyConverter:
    """``module:function`` resolved on first call; ``inspect.signature`` sees the real signature."""

    def __init__(self, target: str):
        self.target = target
        self._fn = None

    def resolve(self):
        if self._fn is None:
            module, _, attr = self.target.partition(":")
            self._fn = getattr(importlib.import_module(f"{_PKG}.{module}"), attr)
        return self._fn

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(self.resolve())

    def __repr__(self) -> str:
        return f"LazyConverter({self.target!r})"


def _spec(name, target, *, summary, reference, default_id, default_name, layout, hint, options=None):
    return ConverterSpec(name=name, convert=LazyConverter(target), summary=summary, reference=reference,
                         default_id=default_id, default_name=default_name, source_layout=layout,
                         download_hint=hint, extra={"options": options or {}})


_NP = {"num_processes": "worker processes (default: min(8, CPUs))"}


def builtin_converters() -> list[ConverterSpec]:
    return [
        _spec("generic", "generic:convert",
              summary="Any folder of images + masks (2D png/jpg/bmp/tif or 3D nii/nrrd/mha), with a value mapping.",
              reference="", default_id=None, default_name="Generic",
              layout="SOURCE/{images,masks}/ (or {train,val,test}/{image,mask}/); masks pair by name "
                     "(+ _mask/_segmentation/_anno suffix)",
              hint="Your own data; give --id.",
              options={"images": "image folder relative to SOURCE", "masks": "mask folder",
                       "test_images": "test image folder", "test_masks": "test mask folder",
                       "mask_suffix": "suffix of mask names (auto)", "labels": "background,class1,... (multi-class)",
                       "mapping": "value mapping, e.g. 255:1,128:2", "threshold": "binarise masks at this value",
                       "channels": "rgb | gray | auto", **_NP}),
        _spec("hmeps", "hmeps:convert",
              summary="HMEPS (binary) via the generic converter; images kept 3-channel.",
              reference="Ciampi et al. 2025 (diffusion teacher-student), HMEPS setting",
              default_id=513, default_name="HMEPS",
              layout="SOURCE/{train,val}/{image,mask}/ (Ciampi layout) or SOURCE/{images,masks}/",
              hint="No public source found; use the copy you were given.",
              options={"images": "image folder", "masks": "mask folder", "mask_suffix": "mask name suffix",
                       "threshold": "binarise masks at this value", "channels": "rgb | gray", **_NP}),
        _spec("ph2", "ph2:convert",
              summary="PH2 dermoscopy, binary lesion masks (1-bit/RGB BMP read exactly).",
              reference="Mendonca et al., EMBC 2013", default_id=512, default_name="PH2",
              layout="PH2Dataset/PH2 Dataset images/IMDxxx/{IMDxxx_Dermoscopic_Image/IMDxxx.bmp, "
                     "IMDxxx_lesion/IMDxxx_lesion.bmp}",
              hint="https://www.fc.up.pt/addi/ph2%20database.html (PH2Dataset.rar)", options=_NP),
        _spec("la2018", "la2018:convert",
              summary="Left Atrium 2018: original nrrd or UA-MT h5 (0.625 mm spacing restored); UA-MT 80/20 split.",
              reference="Xiong et al. MedIA 2021; Yu et al. (UA-MT) MICCAI 2019", default_id=502,
              default_name="LA2018",
              layout="Training Set/<ID>/{lgemri.nrrd,laendo.nrrd}  or  2018LA_Seg_Training Set/<ID>/mri_norm2.h5 "
                     "[+ train.list, test.list]",
              hint="Challenge data: http://atriaseg2018.cardiacatlas.org ; h5 form: github.com/yulequan/UA-MT (data/)",
              options={"split": "uamt (default) | none", "spacing": "h5 form: x,y,z mm (default 0.625,0.625,0.625)",
                       **_NP}),
        _spec("kvasir-seg", "polyp:convert_kvasir",
              summary="Kvasir-SEG polyps (JPEG masks thresholded); also its part of the PraNet package.",
              reference="Jha et al., MMM 2020", default_id=514, default_name="KvasirSEG",
              layout="Kvasir-SEG/{images,masks}/<id>.jpg  or  PraNet TrainDataset/ + TestDataset/Kvasir/",
              hint="https://datasets.simula.no/kvasir-seg/ (kvasir-seg.zip)", options=_NP),
        _spec("cvc-clinicdb", "polyp:convert_clinicdb",
              summary="CVC-ClinicDB polyps (612 TIFFs); also its part of the PraNet package.",
              reference="Bernal et al., CMIG 2015", default_id=516, default_name="CVCClinicDB",
              layout="CVC-ClinicDB/{Original,Ground Truth}/*.tif  or  PraNet TrainDataset/ + TestDataset/CVC-ClinicDB/",
              hint="https://polyp.grand-challenge.org/CVCClinicDB/", options=_NP),
        _spec("polyp-pranet", "polyp:convert_pranet",
              summary="PraNet polyp package: 1450 training images; Kvasir/ClinicDB/ColonDB/CVC-300/ETIS test sets.",
              reference="Fan et al., PraNet, MICCAI 2020", default_id=515, default_name="PolypPraNet",
              layout="TrainDataset/{image,mask}/*.png, TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,CVC-300,"
                     "ETIS-LaribPolypDB}/{images,masks}/*.png",
              hint="github.com/DengPingFan/PraNet (Google Drive links for TrainDataset.zip, TestDataset.zip)",
              options=_NP),
        _spec("acdc", "acdc:convert",
              summary="ACDC cine-MRI (RV/MYO/LV): NIfTI download or SSL4MIS h5 (slices rebuilt); SSL4MIS 70/10/20.",
              reference="Bernard et al., IEEE TMI 2018", default_id=501, default_name="ACDC",
              layout="{training,testing}/patientXXX/{Info.cfg, patientXXX_frameYY[_gt].nii.gz}  or  "
                     "data/patientXXX_frameYY.h5, data/slices/*_slice_N.h5 [+ train/val/test.list]",
              hint="https://humanheart-project.creatis.insa-lyon.fr/database/ ; h5 form: SSL4MIS (github.com/HiLab-git/SSL4MIS)",
              options={"split": "ssl4mis (default) | official", "spacing": "h5 form: x,y,z mm (default 1,1,10)", **_NP}),
        _spec("brats2019", "volumes:convert_brats2019",
              summary="BraTS 2019: SSL setting (FLAIR, whole tumour) or 4 modalities with regions; SSL4MIS 250/25/60.",
              reference="Menze et al. TMI 2015; Bakas et al. 2018", default_id=503, default_name="BraTS2019",
              layout="MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/BraTS19_*/BraTS19_*_{t1,t1ce,t2,flair,seg}.nii.gz",
              hint="https://www.med.upenn.edu/cbica/brats2019/data.html (registration required)",
              options={"setting": "ssl (default) | regions", "split": "ssl4mis (default) | none", **_NP}),
        _spec("pancreas-ct", "pancreas_ct:convert",
              summary="NIH Pancreas-CT: TCIA DICOM + NIfTI labels (orientation checked) or MC-Net/BCP h5 "
                      "(1 mm assumed); MC-Net 62/20 split, cases 25/70 dropped.",
              reference="Roth et al., MICCAI 2015 (TCIA Pancreas-CT); Wu et al. (MC-Net) MICCAI 2021",
              default_id=504, default_name="PancreasCT",
              layout="Pancreas-CT/PANCREAS_XXXX/<study>/<series>/*.dcm + TCIA_pancreas_labels-*/labelXXXX.nii.gz  "
                     "or  Pancreas_h5/imageXXXX_norm.h5 [+ train.list, test.list]",
              hint="https://www.cancerimagingarchive.net/collection/pancreas-ct/ (NBIA Data Retriever; labels as "
                   "a separate zip) ; h5 form: github.com/ycwu1997/MC-Net (data/Pancreas)",
              options={"split": "mcnet (default) | coranet | none",
                       "keep_duplicates": "keep the reported duplicate cases 25 and 70 (default true: the papers' 62/20)",
                       "spacing": "h5 form: x,y,z mm (default 1,1,1, assumed)", **_NP}),
        _spec("msd-prostate", "volumes:convert_msd_prostate",
              summary="MSD Task05 Prostate: 4D (T2, ADC) split into two channels; PZ/TZ.",
              reference="Antonelli et al., Nat. Commun. 2022", default_id=506, default_name="Prostate",
              layout="Task05_Prostate/{dataset.json, imagesTr/prostate_XX.nii.gz, labelsTr/, imagesTs/}",
              hint="http://medicaldecathlon.com (Task05_Prostate.tar)",
              options={"channels": "t2,adc (default) | t2 | adc", **_NP}),
        _spec("mscmrseg2019", "volumes:convert_mscmrseg",
              summary="MS-CMRSeg 2019 (LGE by default); 200/500/600 -> LV myocardium / LV / RV.",
              reference="Zhuang, TPAMI 2019", default_id=505, default_name="MSCMRSeg2019",
              layout="patientN_{C0,T2,LGE}.nii.gz and patientN_{...}_manual.nii.gz anywhere under SOURCE",
              hint="https://zmiclab.github.io/zxh/0/mscmrseg19/ (registration required)",
              options={"sequence": "LGE (default) | C0 | T2", **_NP}),
        _spec("busi", "natural:convert_busi",
              summary="BUSI breast ultrasound; several _mask_N files OR-merged; normal cases kept with empty masks.",
              reference="Al-Dhabyani et al., Data in Brief 2020", default_id=518, default_name="BUSI",
              layout='Dataset_BUSI_with_GT/{benign,malignant,normal}/"benign (N).png" + "benign (N)_mask[_K].png"',
              hint="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (or Kaggle 'breast-ultrasound-images-dataset')",
              options={"channels": "gray (default) | rgb", **_NP}),
        _spec("isic2018", "natural:convert_isic2018",
              summary="ISIC 2018 Task 1 lesions; official Training/Validation split, Test to imagesTs.",
              reference="Codella et al. 2019", default_id=517, default_name="ISIC2018",
              layout="ISIC2018_Task1-2_{Training,Validation,Test}_Input/*.jpg + "
                     "ISIC2018_Task1_{...}_GroundTruth/*_segmentation.png",
              hint="https://challenge.isic-archive.com/data/#2018", options=_NP),
        _spec("glas", "natural:convert_glas",
              summary="GlaS colon glands; instance annotations binarised; testA/testB to imagesTs.",
              reference="Sirinukunwattana et al., MedIA 2017", default_id=511, default_name="GlaS",
              layout="Warwick_QU_Dataset/{train,testA,testB}_N.bmp + *_anno.bmp (+ Grade.csv)",
              hint="https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/ (or Kaggle mirrors)", options=_NP),
        _spec("bcss", "natural:convert_bcss",
              summary="BCSS breast histology ROIs; 0 (outside ROI) -> ignore label; all 21 classes or tumour vs rest.",
              reference="Amgad et al., Bioinformatics 2019", default_id=519, default_name="BCSS",
              layout="rgbs_colorNormalized/TCGA-*.png + masks/TCGA-*.png (same names)",
              hint="https://github.com/PathologyDataScience/BCSS (Google Drive)",
              options={"classes": "all (default) | tumor", **_NP}),
        _spec("mosxav", "video:convert_mosxav",
              summary="MOSXAV X-ray angiography: annotated frames, un-annotated trainval frames -> imagesUnlabeled.",
              reference="Xi, Ma et al. (github.com/xilin-x/MOSXAV)", default_id=521, default_name="MOSXAV",
              layout="MOSXAV_Dataset/{trainval,test}/{JPEGImages,Annotations_Semantic}/vNN/*.{jpg,png}, ImageSets/",
              hint="Links in github.com/xilin-x/MOSXAV (OneDrive, Google Drive, Baidu, HF xilin-x/MOSXAV)",
              options={"channels": "gray (default) | rgb", "unlabeled": "true (default) | false",
                       "pseudo": "folder of your pseudo masks, laid out like Annotations_Semantic -> labelsPseudo/",
                       **_NP}),
        _spec("endoscapes2023", "video:convert_endoscapes",
              summary="Endoscapes2023 Seg50 (255 -> ignore); 343/76/74 split; 1 fps train frames -> imagesUnlabeled.",
              reference="Murali et al. 2023", default_id=522, default_name="Endoscapes2023",
              layout="semseg/{vid}_{frame}.png, {train,val,test}_seg/{vid}_{frame}.jpg, train/*.jpg",
              hint="github.com/CAMMA-public/Endoscapes (endoscapes.zip from s3.unistra.fr)",
              options={"unlabeled": "true (default) | false",
                       "pseudo": "folder of your pseudo masks, {vid}_{frame}.png like semseg/ -> labelsPseudo/",
                       **_NP}),
    ]


@hookimpl
def semidiff_register_converters():
    return builtin_converters()
