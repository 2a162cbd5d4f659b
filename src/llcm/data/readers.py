"""Decode one source file into 8-bit 2D frames: raster formats, DICOM and NIfTI.

Every reader is a pure function of the file's bytes (sources are opened read-only) that returns
`Frame`s or raises `Rejected(reason)`. Intensities are mapped to [0, 255] once, here, with the
rules medical formats need and generic loaders get wrong:

- 16-bit PNG/TIFF keep their true bit depth: values are divided by 2**k - 1, k the bit length of
  the largest value (12-bit data in a 16-bit container is not crushed by a `>> 8`).
- DICOM follows PS3.3 C.11: modality LUT / rescale slope-intercept first, then the VOI LUT
  Sequence or the window (C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID), then MONOCHROME1 inversion.
  Without a window, >8-bit data is scaled between its 0.5th and 99.5th percentiles (per file, so
  the frames of one file share one scaling).
- NIfTI volumes are reoriented to RAS+ and cut into 2D slices along one axis; intensities are scaled
  per volume between the 0.5th and 99.5th percentiles of the non-zero voxels; empty slices are
  rejected as `empty_slice`.

Sizes are judged from headers before anything is decoded or inflated (`MAX_FILE_BYTES`,
`MAX_PIXELS`, `check_pixels`): a file over them is rejected as `too_large`.

Nothing from a DICOM header leaves this module except the `modality` and `body_part` defined terms
(any other Body Part Examined value is dropped, flagged `body_part_dropped`); the identifying
values are returned only as SHA-256 hashes of their tokens (`phi_tokens`, also attached to a
`Rejected` DICOM) so the builder can refuse labels that contain them. The builder keeps these
hashes in memory only: they are never written, not even to its resume journal.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RASTER_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic", ".ima"}
NIFTI_EXTENSIONS = {".nii", ".nii.gz"}

# The rejection reasons a reader can raise (the builder adds the cleaning and layout ones).
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
TOO_LARGE = "too_large"
DICOM_NO_PIXELS = "dicom_no_pixels"
DICOM_UNDECODABLE = "dicom_compressed_undecodable"
DICOM_BURNED_IN = "dicom_burned_in_annotation"
EMPTY_SLICE = "empty_slice"

# Limits on what one file may decode to, checked from its header before anything is decoded
# (decompression bombs: a few hundred KB of zeros can claim gigabytes).
MAX_FILE_BYTES = 512 << 20  # bytes of one file or archive member, after decompression (.nii.gz, deflated DICOM)
MAX_PIXELS = 1 << 28  # samples of one file: DICOM Rows*Columns*frames*samples, NIfTI voxels of all volumes
# Raster formats are held to Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS, about 89 million pixels).

# DICOM Modality defined terms (PS3.3 C.7.3.1.1.1) we pass through; anything else becomes "OT".
_DICOM_MODALITIES = {
    "CR", "CT", "DX", "MR", "US", "NM", "PT", "XA", "RF", "MG", "IO", "PX", "OP", "OPT", "SM", "ES",
    "XC", "GM", "OT", "SC", "BI", "DG", "RG", "TG", "OCT", "IVOCT", "IVUS", "SEG",
}
# Body Part Examined defined terms (PS3.16 Annex L); any other value (free text, a name, a number) is
# dropped, because the field is free enough in practice to carry identifiers.
DICOM_BODY_PARTS = frozenset("""
ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANUS AORTA AORTICARCH APPENDIX ARM AXILLA BACK
BILEDUCT BLADDER BRAIN BRAINSTEM BREAST BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK
CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE
CTSPINE DUODENUM EAR ELBOW ENDOMETRIUM ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FIBULA FINGER FOOT
FOREARM GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM INTESTINE JAW JEJUNUM KIDNEY
KNEE LARYNX LEG LIVER LOWEREXTREMITY LSPINE LSSPINE LUNG MANDIBLE MAXILLA MEDIASTINUM MOUTH NECK
NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS PENIS
PHARYNX PROSTATE RADIUS RADIUSULNA RECTUM RETINA RIB SACRUM SCALP SCAPULA SCLERA SCROTUM SHOULDER SKULL
SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THORAX THUMB THYMUS THYROID TIBIA
TLSPINE TMJ TOE TONGUE TRACHEA TSPINE ULNA UPPEREXTREMITY URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY
WRIST ZYGOMA
""".split())
# Header elements whose values identify a person or an event: patient/physician names (PN),
# identifiers and every date. Only hashes of their tokens are kept, to audit labels.
_PHI_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "IssuerOfPatientID",
    "AccessionNumber", "StudyID", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "PatientMotherBirthName", "OtherPatientNames", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "InstanceCreationDate", "PatientAddress",
)
NIFTI_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


class Rejected(Exception):
    """A file or frame that cannot enter the dataset; `reason` is one of the fixed reason keys."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Frame:
    """One 2D image: uint8 (H, W) grayscale or (H, W, 3) RGB, plus whitelisted metadata."""

    pixels: np.ndarray
    index: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class Decoded:
    """The frames of one file, the per-frame rejections (e.g. empty NIfTI slices) and PHI hashes."""

    frames: list[Frame]
    rejected: list[tuple[int, str]] = field(default_factory=list)
    phi_tokens: list[str] = field(default_factory=list)
    dicom: bool = False


def token_hash(token: str) -> str:
    """The hash under which an identifying token is remembered (never the token itself)."""
    return hashlib.sha256(("llcm-phi:" + token.lower()).encode()).hexdigest()[:20]


def phi_word_tokens(text: str) -> list[str]:
    """Alphanumeric tokens of an identifying value that are long enough to be distinctive."""
    return [t for t in re.split(r"[^0-9a-z]+", text.lower()) if len(t) >= 3]


def file_kind(path: Path, head: bytes) -> str | None:
    """'raster', 'dicom', 'nifti' or None, from magic bytes first and the extension second."""
    name = path.name.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        return "nifti"
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
                        b"II*\x00", b"MM\x00*")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "raster"
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    if suffix in RASTER_EXTENSIONS:
        return "raster"  # PIL decides: most likely "not an image"
    if suffix == "" and len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00"):
        return "dicom"  # a DICOM data set without preamble (group 0002/0008 first)
    return None


def is_candidate(path: Path, head: bytes) -> bool:
    """Whether a file in a source tree is meant to be an image (and so counted if it is not)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")) or path.suffix.lower() in RASTER_EXTENSIONS | DICOM_EXTENSIONS:
        return True
    return file_kind(path, head) is not None


def check_pixels(count: int, what: str) -> None:
    """The one size check of a decoded image or volume, from its header, before it is decoded."""
    if count > MAX_PIXELS:
        raise Rejected(TOO_LARGE, f"{what}: more than {MAX_PIXELS} pixels")


def decode_file(path: Path, *, nifti_axis: str = "axial", nifti_step: int = 1,
                max_pixels: int = 178_956_970) -> Decoded:
    """Decode any supported file; raises `Rejected` for a file that yields no frame at all."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:  # one read: the decoders work from memory
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise Rejected(TOO_LARGE, f"{size} bytes")
            data = fh.read(size + 1)  # sized by fstat: read(MAX + 1) would reserve 512 MiB for every file
    except OSError as exc:
        raise Rejected(UNREADABLE, type(exc).__name__) from None
    if len(data) > MAX_FILE_BYTES:  # it grew while being read
        raise Rejected(TOO_LARGE, f"more than {MAX_FILE_BYTES} bytes")
    if not data:
        raise Rejected(UNREADABLE, "empty file")
    kind = file_kind(path, data[:512])
    if kind == "dicom":
        return read_dicom(data)
    if kind == "nifti":
        return read_nifti(data, axis=nifti_axis, step=nifti_step)
    if kind == "raster":
        return Decoded([read_raster(data, max_pixels=max_pixels)])
    raise Rejected(NOT_AN_IMAGE, "unknown format")


def _source(data: bytes | str | Path):
    """A file-like object for decoders from bytes, or the path itself."""
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data


# ----------------------------------------------------------------------------------------------
# Raster formats (Pillow)


def _scale_integer(arr: np.ndarray) -> np.ndarray:
    """Integer data deeper than 8 bits -> [0, 1] by its true bit depth (2**k - 1, k = bit length of max)."""
    arr = arr.astype(np.float64)
    lo = float(arr.min())
    if lo < 0:  # signed data: shift to zero first
        arr = arr - lo
    top = float(arr.max())
    bits = max(8, int(top).bit_length())
    return arr / float(2**bits - 1)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 with round-half-up (deterministic across platforms)."""
    return np.floor(np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """An RGB array whose three channels are equal is returned as (H, W) grayscale."""
    if rgb.ndim == 3 and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def read_raster(data: bytes | Path, *, max_pixels: int = 178_956_970) -> Frame:
    """JPEG, PNG (8/16-bit), TIFF, BMP, WebP, GIF (first frame) -> one `Frame` (bytes or a path)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_source(data))
    except UnidentifiedImageError:
        raise Rejected(NOT_AN_IMAGE, "not a recognised image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected(TOO_LARGE, "more pixels than the limit") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a rejected file
        raise Rejected(UNREADABLE, type(exc).__name__) from None
    with img:
        if img.width * img.height > max_pixels:
            raise Rejected(TOO_LARGE, f"{img.width}x{img.height}")
        try:
            img.seek(0)  # GIF / multi-page TIFF: the first frame
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated, broken stream, bad tables...
            raise Rejected(UNREADABLE, type(exc).__name__) from None
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            unit = _scale_integer(np.asarray(img))
            return Frame(to_uint8(unit))
        if mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            if not np.isfinite(arr).all():
                arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = float(arr.min()), float(arr.max())
            return Frame(to_uint8((arr - lo) / (hi - lo) if hi > lo else arr * 0.0))
        if mode in ("1", "L", "LA", "La"):
            return Frame(np.asarray(img.convert("L")).copy())
        if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            rgb = Image.alpha_composite(black, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
        return Frame(collapse_gray(np.asarray(rgb).copy()))


# ----------------------------------------------------------------------------------------------
# DICOM (pydicom)


def _dicom_meta(ds) -> dict:
    meta = {}
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality:
        meta["modality"] = modality if modality in _DICOM_MODALITIES else "OT"
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body in DICOM_BODY_PARTS:
        meta["body_part"] = body
    elif body:
        meta["body_part_dropped"] = True  # counted in the card; the value itself goes nowhere
    return meta


SYNTHETIC_MARKER = "SYNTHETIC"  # PatientName/PatientID of a generated image (llcm.medical_files)


def _dicom_phi(ds) -> list[str]:
    tokens: set[str] = set()
    for keyword in _PHI_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed element cannot be audited, skip it
            continue
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            if str(v).strip().upper() == SYNTHETIC_MARKER:  # llcm synthesize's files name no one
                continue
            for tok in phi_word_tokens(str(v)):
                tokens.add(token_hash(tok))
    return sorted(tokens)


def _first(value) -> float:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def window_unit(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI window -> [0, 1] (DICOM PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.2 LINEAR_EXACT, .3.1 SIGMOID)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        width = 1.0
    # y = ((x - (c - 0.5)) / (w - 1) + 0.5) for c - 0.5 - (w-1)/2 < x <= c - 0.5 + (w-1)/2
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _percentile_unit(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(data: bytes | Path) -> Decoded:
    """DICOM (bytes or a path) -> frames: rescale, then VOI LUT or window, MONOCHROME1 inversion."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(data, (bytes, bytearray)):
        _check_deflated_size(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(_source(data))
            except InvalidDicomError:
                ds = pydicom.dcmread(_source(data), force=True)
            ds.get("PixelData")  # force parsing up to the pixel data
    except Exception as exc:  # noqa: BLE001
        raise Rejected(UNREADABLE, f"DICOM: {type(exc).__name__}") from None
    phi = _dicom_phi(ds)
    try:
        return _dicom_frames(ds, phi)
    except Rejected as exc:
        exc.phi_tokens = phi  # a refused file's identifiers still guard the labels
        raise


def _check_deflated_size(data: bytes) -> None:
    """pydicom inflates a Deflated Explicit VR data set in one piece: measure it first, in bounded chunks."""
    if b"1.2.840.10008.1.2.1.99" not in data[:16384]:  # the transfer syntax sits in the file meta group
        return
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, True)
        if _read_file_meta_info(fp).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
    except Exception:  # noqa: BLE001 - pydicom itself will refuse the file
        return
    inflater, rest, total, chunk = zlib.decompressobj(-zlib.MAX_WBITS), memoryview(data)[fp.tell():], 0, 1 << 24
    try:
        while True:
            out = inflater.decompress(rest, chunk)
            total += len(out)
            if total > MAX_FILE_BYTES:
                raise Rejected(TOO_LARGE, f"deflated DICOM of more than {MAX_FILE_BYTES} bytes")
            rest = inflater.unconsumed_tail
            if inflater.eof or (not rest and len(out) < chunk):
                return
    except zlib.error:
        return  # corrupt: pydicom reports it


def _dicom_pixel_count(ds) -> int:
    """Rows x Columns x frames x samples, from the header (before any pixel is decoded)."""
    try:
        dims = [int(ds.get(k, d) or d) for k, d in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1),
                                                      ("SamplesPerPixel", 1))]
    except (TypeError, ValueError):
        raise Rejected(UNREADABLE, "DICOM: non-numeric image size") from None
    return math.prod(max(0, d) for d in dims)


def read_dicom_phi(path: Path) -> list[str]:
    """Only the hashed identifier tokens of a DICOM file (header only, no pixels)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _dicom_phi(pydicom.dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001
        return []


def _dicom_frames(ds, phi: list[str]) -> Decoded:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise Rejected(DICOM_NO_PIXELS, str(ds.get("SOPClassUID", "")))
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise Rejected(DICOM_BURNED_IN, "BurnedInAnnotation YES")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    check_pixels(_dicom_pixel_count(ds), "DICOM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        if ts is not None and ts.is_compressed:
            raise Rejected(DICOM_UNDECODABLE, ts.name) from None
        raise Rejected(UNREADABLE, f"DICOM pixels: {type(exc).__name__}") from None
    meta = _dicom_meta(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            bits = 16 if rgb.dtype.itemsize > 1 else 8
            unit = rgb.astype(np.float64) / float(2**bits - 1)
            frames_unit = unit if n_frames > 1 else unit[None]
        elif samples == 3:
            # pydicom returns YBR data converted to RGB; scale by the stored bit depth
            bits = int(ds.get("BitsStored", 8) or 8)
            unit = arr.astype(np.float64) / float(2**bits - 1)
            frames_unit = unit if n_frames > 1 else unit[None]
        else:
            frames = arr if n_frames > 1 else arr[None]
            x = apply_modality_lut(frames, ds).astype(np.float64)
            center = _first(ds.get("WindowCenter"))
            width = _first(ds.get("WindowWidth"))
            if "VOILUTSequence" in ds:
                lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                if np.array_equal(x, np.round(x)):  # the LUT indexes stored (integer) values
                    x = x.astype(np.int64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x = apply_voi_lut(x, ds, index=0, prefer_lut=True).astype(np.float64)
                frames_unit = np.clip(x / float(2**lut_bits - 1), 0.0, 1.0)
            elif center is not None and width is not None and width > 0:
                frames_unit = window_unit(x, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
            elif x.dtype.kind in "iu" or int(ds.get("BitsStored", 8) or 8) > 8 or x.min() < 0 or x.max() > 255:
                frames_unit = _percentile_unit(x)
            else:
                frames_unit = x / 255.0
            if photometric == "MONOCHROME1":
                frames_unit = 1.0 - frames_unit
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUTs, odd shapes
        raise Rejected(UNREADABLE, f"DICOM LUT: {type(exc).__name__}") from None
    out = []
    for i, unit in enumerate(frames_unit):
        if not np.isfinite(unit).all():
            unit = np.nan_to_num(unit)
        px = to_uint8(unit)
        out.append(Frame(collapse_gray(px) if px.ndim == 3 else px, index=i, meta=dict(meta)))
    return Decoded(out, phi_tokens=phi, dicom=True)


# ----------------------------------------------------------------------------------------------
# NIfTI (nibabel)


def read_nifti(data: bytes | Path, *, axis: str = "axial", step: int = 1, empty_fraction: float = 0.02) -> Decoded:
    """NIfTI volume -> 2D slices along `axis` (RAS+), every `step`-th; empty slices rejected.

    A slice is empty when fewer than `empty_fraction` of its pixels exceed 2% of the volume's
    intensity range. 4D data uses the first volume.
    """
    import nibabel as nib

    if axis not in NIFTI_AXES:
        raise ValueError(f"nifti axis must be one of {sorted(NIFTI_AXES)}")
    try:
        raw = _nifti_bytes(data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes())
        img = nib.Nifti1Image.from_bytes(raw) if raw[344:348] in (b"n+1\x00", b"ni1\x00") else \
            nib.Nifti2Image.from_bytes(raw)
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected(UNREADABLE, f"NIfTI: {type(exc).__name__}") from None
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or data.size == 0:
        raise Rejected(NOT_AN_IMAGE, "NIfTI without a 2D/3D image")
    data = np.nan_to_num(data, copy=False)
    nonzero = data[data != 0]
    if nonzero.size == 0:
        lo = hi = 0.0
    else:
        lo, hi = np.percentile(nonzero, [0.5, 99.5])
        lo = min(float(lo), 0.0) if float(data.min()) >= 0 else float(lo)
    del nonzero
    ax = NIFTI_AXES[axis]
    frames, rejected = [], []
    for i in range(0, data.shape[ax], max(1, int(step))):
        # basic slicing: a view (np.take on the Fortran-ordered volume copies with a slow gather)
        sl = data[(slice(None),) * ax + (i,)]
        sl = np.clip((sl - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(sl)
        # RAS+: rotate so anterior (axial) or superior (coronal, sagittal) is up; the patient's
        # left is on the image's left (neurological convention).
        sl = np.rot90(sl)
        if float((sl > 0.02).mean()) < empty_fraction:
            rejected.append((i, EMPTY_SLICE))
            continue
        frames.append(Frame(to_uint8(np.ascontiguousarray(sl)), index=i))
    if not frames and not rejected:
        raise Rejected(NOT_AN_IMAGE, "no slices")
    return Decoded(frames, rejected=rejected)


def _nifti_bytes(raw: bytes) -> bytes:
    """The uncompressed bytes of a NIfTI-1/2 file, after its header passed the size checks; a .nii.gz
    is inflated only up to the size its header declares."""
    import nibabel as nib

    stream = gzip.GzipFile(fileobj=io.BytesIO(raw)) if raw[:2] == b"\x1f\x8b" else io.BytesIO(raw)
    head = stream.read(540)  # the NIfTI-2 header size (NIfTI-1: 348 + extension flag)
    header_class = nib.Nifti1Header if head[344:348] in (b"n+1\x00", b"ni1\x00") else nib.Nifti2Header
    header = header_class.from_fileobj(io.BytesIO(head))
    shape = header.get_data_shape()
    check_pixels(math.prod(shape), "NIfTI " + "x".join(map(str, shape)))
    needed = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    if needed > MAX_FILE_BYTES:
        raise Rejected(TOO_LARGE, f"NIfTI of {needed} bytes")
    if isinstance(stream, io.BytesIO):
        return raw
    return head + stream.read(max(0, needed - len(head)))
