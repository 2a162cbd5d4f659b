"""A generated 2D image as the bytes of a DICOM or NIfTI file, for a synthetic dataset.

What a reader of synthetic data needs from such a file: that it says it is synthetic (DICOM
Secondary Capture, ConversionType SYN, PatientName/PatientID "SYNTHETIC"), that it carries no
identity, date or time, and that its UIDs are derived from the caller's keys (study, series,
instance), so a rerun of the same generation writes byte-identical files. The functions return
bytes; the caller writes them (atomically).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re

import numpy as np

from llcm.data.readers import DICOM_BODY_PARTS

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (PS3.4 B.5)
SYNTHETIC = "SYNTHETIC"

# Taxonomy modality -> DICOM Modality defined term (PS3.3 C.7.3.1.1.1); keys as the taxonomy spells them.
DICOM_MODALITY: dict[str, str] = {
    "MRI": "MR",
    "CT": "CT",
    "X-ray": "DX",
    "dental X-ray": "DX",  # intra-oral (IO) or panoramic (PX) is not known from the label
    "mammography": "MG",
    "ultrasound": "US",
    "nuclear medicine": "NM",
    "PET": "PT",
    "angiography": "XA",
    "fundus photograph": "OP",
    "OCT": "OPT",
    "histopathology": "SM",
    "microscopy": "GM",
    "endoscopy": "ES",
    "dermoscopy": "XC",
    "clinical photograph": "XC",
}
_MODALITY_BY_NAME = {k.casefold(): v for k, v in DICOM_MODALITY.items()}

# Taxonomy words whose Body Part Examined defined term (PS3.16 Annex L) is not the words joined.
_BODY_PART_SYNONYMS = {"HEADANDNECK": "HEADNECK", "OESOPHAGUS": "ESOPHAGUS"}

# pydicom writes its own name and version into the file meta unless an implementation is named:
# the bytes would then change with the pydicom version.
_IMPLEMENTATION_VERSION = "LLCM"


def dicom_modality(modality: str) -> str:
    """The DICOM Modality code of a taxonomy modality (case-insensitive); "OT" (other) if unknown."""
    return _MODALITY_BY_NAME.get(str(modality).strip().casefold(), "OT")


def body_part_code(body_part: str) -> str:
    """A Body Part Examined defined term (CS: upper case, at most 16 of A-Z 0-9 _ and space), or "".

    The words are upper-cased and joined ("whole body" -> "WHOLEBODY"); only PS3.16 defined terms
    are returned, because `llcm.data.readers` drops (and counts) any other value when the dataset
    is read back. "" means unknown: `dicom_bytes` then leaves the (type 3) element out.
    """
    code = "".join(re.findall(r"[A-Z0-9]+", str(body_part).upper()))
    code = _BODY_PART_SYNONYMS.get(code, code)
    return code if code in DICOM_BODY_PARTS else ""


def synthetic_uid(*parts: object) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (PS3.5 B.2) from `parts`.

    The UUID is an RFC 9562 version-8 (custom) UUID whose other 122 bits come from the SHA-256 of
    the parts (each as str, length-prefixed so ("ab", "c") and ("a", "bc") differ).
    """
    text = "".join(f"{len(s)}:{s};" for s in map(str, ("llcm-synthetic-uid", *parts)))
    n = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # variant 10 (RFC 9562)
    return f"2.25.{n}"  # at most 5 + 39 digits


def _one_line(text: str, limit: int) -> str:
    """An LO value: no backslash (the value delimiter) or control character, at most `limit` chars."""
    return re.sub(r"[\\\x00-\x1f\x7f]+", " ", str(text)).strip()[:limit].rstrip()


def _long_text(text: str, limit: int) -> str:
    """An LT value: the control characters other than CR, LF, FF and ESC become spaces."""
    return re.sub(r"[\x00-\x09\x0b\x0e-\x1a\x1c-\x1f\x7f]", " ", str(text))[:limit].rstrip()


def dicom_bytes(pixels: np.ndarray, *, modality: str, body_part: str, description: str, comments: str,
                study_key: str, series_key: str, instance_key: str, instance_number: int,
                series_number: int = 1) -> bytes:
    """One uint8 image as a Secondary Capture DICOM file (explicit VR little endian, uncompressed).

    (H, W) is written MONOCHROME2, (H, W, 3) RGB (colour-by-pixel). The file is marked synthetic
    (ImageType DERIVED\\SECONDARY, ConversionType SYN, PatientName/PatientID "SYNTHETIC") and holds
    no date, time or person: the type 2 identity and date elements are present but empty. The UIDs
    are `synthetic_uid("study", study_key)`, `("series", series_key)`, `("instance", instance_key)`.
    `description` becomes SeriesDescription (64 chars), `comments` ImageComments (10240 chars).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.size == 0:
        raise ValueError(f"dicom_bytes takes uint8 pixels of shape (H, W) or (H, W, 3), "
                         f"not {arr.dtype} of shape {arr.shape}")
    if max(arr.shape[:2]) > 0xFFFF:
        raise ValueError(f"dicom_bytes: {arr.shape[0]}x{arr.shape[1]} exceeds DICOM's 65535 rows/columns")
    instance_uid = synthetic_uid("instance", instance_key)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = synthetic_uid("implementation", "llcm")
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts need not be ASCII
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = instance_uid
    # Patient: marked synthetic; the type 2 elements present and empty
    ds.PatientName = SYNTHETIC
    ds.PatientID = SYNTHETIC
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study: no date, time or person
    ds.StudyInstanceUID = synthetic_uid("study", study_key)
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # General Series
    ds.Modality = dicom_modality(modality)
    ds.SeriesInstanceUID = synthetic_uid("series", series_key)
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = _one_line(description, 64)
    if body_part_code(body_part):  # type 3: left out when unknown
        ds.BodyPartExamined = body_part_code(body_part)
    # SC Equipment
    ds.ConversionType = "SYN"  # synthetic image
    # General Image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = int(instance_number)
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = _long_text(comments, 10240)
    # Image Pixel
    color = arr.ndim == 3
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        ds.PlanarConfiguration = 0  # R1 G1 B1 R2 ...: the array's own (H, W, 3) order
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()  # OB; pydicom pads an odd length with one 0

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def nifti_bytes(pixels: np.ndarray, *, description: str = "", compress: bool = True) -> bytes:
    """A uint8 image (H, W), or a stack (N, H, W) of N slices, as a NIfTI-1 file with a unit affine.

    NIfTI holds grayscale images only: `llcm.data.readers.read_nifti` reads one scalar per voxel
    (an RGB24 volume fails to load, a vector dimension is cut to its first channel), so colour
    input, (H, W, 3) or (N, H, W, 3), is a ValueError. Slice k is stored so that `read_nifti`
    (RAS+, axial, image rows from anterior to posterior) returns `pixels[k]` unchanged: voxel
    (x, y, k) = pixels[k, H - 1 - y, x]. `compress` gives .nii.gz bytes whose gzip mtime is 0;
    `description` goes to the header's `descrip` (80 bytes, trimmed).
    """
    import nibabel as nib

    arr = np.asarray(pixels)
    if arr.ndim >= 3 and arr.shape[-1] == 3:
        raise ValueError(f"NIfTI holds grayscale images only: got shape {arr.shape} "
                         "(a last axis of 3 is taken as colour)")
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"nifti_bytes takes uint8 pixels of shape (H, W) or (N, H, W), "
                         f"not {arr.dtype} of shape {arr.shape}")
    stack = arr[None] if arr.ndim == 2 else arr
    volume = np.ascontiguousarray(stack[:, ::-1, :].transpose(2, 1, 0))  # (W, H, N): x right, y up
    img = nib.Nifti1Image(volume, np.eye(4))
    img.header.set_sform(np.eye(4), code="aligned")
    img.header.set_qform(np.eye(4), code="aligned")
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(description)).strip()
    img.header["descrip"] = text.encode("utf-8")[:80].decode("utf-8", "ignore").encode("utf-8")
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw
