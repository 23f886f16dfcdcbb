"""Synthetic multi-hospital DICOM data for the demos, benches and tests: a lesion-or-not
classification task (grayscale CT / X-ray slices, :mod:`.classification`), a colour one
(dermatology-like photographs, :mod:`.colour`) and a 3-D segmentation one
(:mod:`.segmentation`). The DICOM-writing parts they share live in :mod:`.dicom_writing`.

Not part of a silo: a hospital's code path never imports this package. Output is
deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

from fedsilo.synthetic.classification import (
    HospitalSpec,
    generate_hospital,
    generate_hospitals,
    generate_test_set,
    lesion_contrast_hu,
    make_hospital_specs,
)
from fedsilo.synthetic.colour import (
    COLOUR_GENERATOR_VERSION,
    ColourHospitalSpec,
    generate_colour_hospital,
    generate_colour_hospitals,
    make_colour_specs,
    render_skin_lesion,
)
from fedsilo.synthetic.dicom_writing import GENERATOR_VERSION
from fedsilo.synthetic.segmentation import (
    SEGMENTATION_GENERATOR_VERSION,
    SegmentationHospitalSpec,
    generate_segmentation_hospital,
    generate_segmentation_hospitals,
    make_segmentation_specs,
    render_ct_volume,
    write_nifti_mask,
    write_seg,
)

__all__ = [
    "COLOUR_GENERATOR_VERSION",
    "GENERATOR_VERSION",
    "SEGMENTATION_GENERATOR_VERSION",
    "ColourHospitalSpec",
    "HospitalSpec",
    "SegmentationHospitalSpec",
    "generate_colour_hospital",
    "generate_colour_hospitals",
    "generate_hospital",
    "generate_hospitals",
    "generate_segmentation_hospital",
    "generate_segmentation_hospitals",
    "generate_test_set",
    "lesion_contrast_hu",
    "make_colour_specs",
    "make_hospital_specs",
    "make_segmentation_specs",
    "render_ct_volume",
    "render_skin_lesion",
    "write_nifti_mask",
    "write_seg",
]
