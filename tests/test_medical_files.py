"""Synthetic DICOM and NIfTI files: tags, pixels read back by pydicom, imageio, nibabel and llcm's own
readers, byte-identical reruns, and refused inputs."""

from __future__ import annotations

import gzip
import io
import re

import numpy as np
import pytest

from llcm.data import readers
from llcm.medical_files import (DICOM_MODALITY, SECONDARY_CAPTURE, body_part_code, dicom_bytes, dicom_modality,
                                nifti_bytes, synthetic_uid)

KEYS = dict(modality="MRI", body_part="brain", description="MRI brain glioma", study_key="run-1",
            series_key="run-1/mri-brain-glioma", instance_key="run-1/mri-brain-glioma/0003",
            instance_number=3, series_number=2,
            comments="generator: llcm\nmodel: 0123abcd\nprompt: an MRI of the brain, glioma\nseed: 3\nsteps: 4")
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random uint8 pixels with full range and 5% at 255 (so percentile scaling maps them to themselves)."""
    rng = np.random.default_rng(seed)
    px = rng.integers(1, 256, shape, dtype=np.uint8)
    px[rng.random(shape) < 0.05] = 255
    px.flat[0] = 0
    return px


@pytest.fixture(params=["gray", "rgb"])
def pixels(request) -> np.ndarray:
    return image((6, 10) if request.param == "gray" else (6, 10, 3), seed=1)


def test_dicom_tags_and_pixels(pixels, tmp_path):
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    data = dicom_bytes(pixels, **KEYS)
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    ds = pydicom.dcmread(path, force=False)  # refuses a file without preamble and file meta
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == SECONDARY_CAPTURE
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == synthetic_uid("instance", KEYS["instance_key"])
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    pydicom.dataset.validate_file_meta(meta, enforce_standard=True)
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    color = pixels.ndim == 3
    expected = {
        "SOPClassUID": SECONDARY_CAPTURE, "ImageType": ["DERIVED", "SECONDARY"], "ConversionType": "SYN",
        "BurnedInAnnotation": "NO", "Modality": "MR", "BodyPartExamined": "BRAIN",
        "PatientName": "SYNTHETIC", "PatientID": "SYNTHETIC",
        "StudyInstanceUID": synthetic_uid("study", KEYS["study_key"]),
        "SeriesInstanceUID": synthetic_uid("series", KEYS["series_key"]),
        "SeriesDescription": KEYS["description"], "ImageComments": KEYS["comments"],
        "SeriesNumber": 2, "InstanceNumber": 3, "Rows": 6, "Columns": 10,
        "SamplesPerPixel": 3 if color else 1, "PhotometricInterpretation": "RGB" if color else "MONOCHROME2",
        "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0,
    }
    assert {k: (list(v) if k == "ImageType" else v) for k in expected for v in [ds[k].value]} == expected
    assert ds.get("PlanarConfiguration") == (0 if color else None)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                    "AccessionNumber", "StudyID", "PatientOrientation"):  # type 2: present, empty
        assert keyword in ds and ds[keyword].is_empty, keyword
    dated = [e for e in [*meta.iterall(), *ds.iterall()] if e.VR in ("DA", "DT", "TM")]
    assert {e.keyword for e in dated} == {"PatientBirthDate", "StudyDate", "StudyTime"}
    assert all(e.is_empty for e in dated)
    assert not [e.keyword for e in ds.iterall() if e.VR == "PN" and str(e.value) not in ("", "SYNTHETIC")]


def test_dicom_text_limits_and_unknown_terms():
    import pydicom

    data = dicom_bytes(image((4, 4)), **{**KEYS, "description": "a\\b\n" + "x" * 100, "modality": "sonar",
                                          "body_part": "bone", "comments": "prompt: œdème\tcérébral " + "y" * 20000})
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SeriesDescription == ("a b " + "x" * 100)[:64]  # LO: no backslash or newline, 64 chars
    assert ds.ImageComments.startswith("prompt: œdème cérébral y") and len(ds.ImageComments) == 10240
    assert ds.Modality == "OT" and "BodyPartExamined" not in ds


def test_modality_and_body_part_codes():
    from llcm.data.taxonomy import load_mapping

    vocabulary = load_mapping()["vocabulary"]
    assert {m: dicom_modality(m) for m in vocabulary["modality"] if dicom_modality(m) == "OT"} == {}
    assert dicom_modality("mri") == "MR" and dicom_modality(" X-ray ") == "DX" and dicom_modality("?") == "OT"
    assert {"MRI": "MR", "CT": "CT", "X-ray": "DX", "ultrasound": "US", "nuclear medicine": "NM", "PET": "PT",
            "fundus photograph": "OP", "histopathology": "SM", "mammography": "MG", "endoscopy": "ES",
            "dermoscopy": "XC"}.items() <= DICOM_MODALITY.items()
    for part in vocabulary["body_part"]:
        code = body_part_code(part)
        assert code == "" or (code in readers.DICOM_BODY_PARTS and re.fullmatch(r"[A-Z0-9_ ]{1,16}", code)), part
    assert [body_part_code(p) for p in ("whole body", "Head and Neck", "oesophagus", "lymph node", "")] == \
        ["WHOLEBODY", "HEADNECK", "ESOPHAGUS", "", ""]
    # every code survives llcm's reader (which turns a modality it does not know into OT)
    for code in sorted(set(DICOM_MODALITY.values())):
        name = next(k for k, v in DICOM_MODALITY.items() if v == code)
        decoded = readers.read_dicom(dicom_bytes(image((2, 2)), **{**KEYS, "modality": name}))
        assert decoded.frames[0].meta == {"modality": code, "body_part": "BRAIN"}


def test_imageio_reads_the_dicom(tmp_path):
    import imageio.v2 as iio

    gray, rgb = image((6, 10), seed=2), image((6, 10, 3), seed=3)
    # even Rows*Columns: imageio's reader does not drop the pad byte of odd-length pixel data
    (tmp_path / "g.dcm").write_bytes(dicom_bytes(gray, **KEYS))
    np.testing.assert_array_equal(iio.imread(tmp_path / "g.dcm", format="DICOM"), gray)
    # imageio ignores PlanarConfiguration: it reshapes colour data to (3, H, W) planes and imread
    # returns the first "plane", the first third of the interleaved bytes. Colour is not supported.
    (tmp_path / "c.dcm").write_bytes(dicom_bytes(rgb, **KEYS))
    first_plane = rgb.reshape(-1)[:60].reshape(6, 10)
    np.testing.assert_array_equal(iio.imread(tmp_path / "c.dcm", format="DICOM"), first_plane)


def test_llcm_readers_read_the_dicom(pixels, tmp_path):
    path = tmp_path / "a.dcm"
    path.write_bytes(dicom_bytes(pixels, **KEYS))
    for decoded in (readers.read_dicom(path), readers.decode_file(path)):
        assert decoded.dicom and len(decoded.frames) == 1 and not decoded.rejected
        np.testing.assert_array_equal(decoded.frames[0].pixels, pixels)  # no window: stored / 255, exact
        assert decoded.frames[0].meta == {"modality": "MR", "body_part": "BRAIN"}
    odd = image((5, 7), seed=4)  # odd Rows*Columns: the pad byte is not a pixel
    np.testing.assert_array_equal(readers.read_dicom(dicom_bytes(odd, **KEYS)).frames[0].pixels, odd)


def test_read_dicom_phi_reports_nothing_for_a_synthetic_file(tmp_path):
    from llcm.data.build import _phi_hit

    path = tmp_path / "a.dcm"
    path.write_bytes(dicom_bytes(image((4, 4)), **KEYS))
    # PatientName/PatientID "SYNTHETIC" is a marker, not a name: the builder's label audit must not refuse a
    # folder called synthetic/ because of it
    hashes = set(readers.read_dicom_phi(path))
    assert hashes == set()
    assert not _phi_hit("synthetic/mri-brain-glioma", hashes, set())


def test_dicom_is_deterministic():
    px = image((6, 10))
    first = dicom_bytes(px, **KEYS)
    assert first == dicom_bytes(px.copy(), **KEYS)
    other = dicom_bytes(px, **{**KEYS, "instance_key": "run-1/mri-brain-glioma/0004"})
    assert other != first and synthetic_uid("instance", KEYS["instance_key"]).encode() not in other
    assert synthetic_uid("study", KEYS["study_key"]).encode() in other


def test_synthetic_uid_grammar():
    uids = [synthetic_uid(*parts) for parts in [(), ("a",), ("ab", "c"), ("a", "bc"), (1, 2.5, None)]]
    assert len(set(uids)) == len(uids) and synthetic_uid("a") == synthetic_uid("a")
    for uid in uids:
        assert uid.startswith("2.25.") and len(uid) <= 64 and UID_RE.match(uid), uid
        n = int(uid[5:])
        assert n < 2**128 and (n >> 76) & 0xF == 8 and (n >> 62) & 0x3 == 2  # RFC 9562 version 8 UUID


@pytest.mark.parametrize("compress", [True, False])
def test_nifti_round_trip(compress):
    import nibabel as nib

    px = image((6, 10), seed=5)
    data = nifti_bytes(px, description="synthetic MRI brain " + "z" * 100, compress=compress)
    assert data == nifti_bytes(px, description="synthetic MRI brain " + "z" * 100, compress=compress)
    if compress:
        assert data[:2] == b"\x1f\x8b" and data[4:8] == bytes(4)  # gzip mtime 0
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data) if compress else data)
    assert img.header["sizeof_hdr"] == 348 and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.header["descrip"].tobytes().rstrip(b"\0") == ("synthetic MRI brain " + "z" * 100)[:80].encode()
    assert img.shape == (10, 6, 1)
    np.testing.assert_array_equal(np.rot90(np.asarray(img.dataobj)[:, :, 0]), px)  # x right, y up
    decoded = readers.read_nifti(data)
    assert len(decoded.frames) == 1 and not decoded.rejected
    np.testing.assert_array_equal(decoded.frames[0].pixels, px)


def test_nifti_stack_round_trip(tmp_path):
    import nibabel as nib

    stack = np.stack([image((6, 10), seed=s) for s in range(4)])
    path = tmp_path / "stack.nii.gz"
    path.write_bytes(nifti_bytes(stack))
    img = nib.load(path)
    assert img.shape == (10, 6, 4)
    for k in range(4):
        np.testing.assert_array_equal(np.rot90(np.asarray(img.dataobj)[:, :, k]), stack[k])
    decoded = readers.decode_file(path)
    assert [f.index for f in decoded.frames] == [0, 1, 2, 3]
    for k, frame in enumerate(decoded.frames):
        np.testing.assert_array_equal(frame.pixels, stack[k])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(16, np.uint8),
                                 np.zeros((4, 4), np.uint16), np.zeros((0, 4), np.uint8),
                                 np.zeros((2, 4, 4, 3), np.uint8)])
def test_bad_pixels_are_refused(bad):
    with pytest.raises(ValueError, match=re.escape(str(bad.shape))):
        dicom_bytes(bad, **KEYS)
    if bad.ndim == 3 and bad.dtype == np.uint8:  # (N, H, W) is a stack for NIfTI
        nifti_bytes(bad)
    else:
        with pytest.raises(ValueError, match=re.escape(str(bad.shape))):
            nifti_bytes(bad)


def test_nifti_refuses_colour():
    with pytest.raises(ValueError, match="NIfTI holds grayscale images only"):
        nifti_bytes(image((6, 10, 3)))
    with pytest.raises(ValueError, match="NIfTI holds grayscale images only"):
        nifti_bytes(image((2, 6, 10, 3)))
