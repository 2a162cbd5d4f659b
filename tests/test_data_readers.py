"""Readers: raster bit depths and formats, DICOM LUT order and photometry, NIfTI slicing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from llcm.data import readers
from llcm.data.readers import Rejected, decode_file, read_dicom, read_nifti, read_raster


def png_bytes(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def ct(values: np.ndarray, *, photometric="MONOCHROME2", window=(40, 80), intercept=-1024, frames=1,
       voi_lut=None, **extra) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = values.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    if voi_lut is not None:
        from pydicom.dataset import Dataset as Item
        from pydicom.sequence import Sequence

        item = Item()
        item.LUTDescriptor = [len(voi_lut), 0, 8]
        item.add_new(0x00283006, "US", list(voi_lut))  # LUT Data
        ds.VOILUTSequence = Sequence([item])
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = values.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_16bit_png_keeps_its_true_bit_depth():
    twelve_bit = np.linspace(0, 4095, 96 * 96).reshape(96, 96).astype(np.uint16)
    frame = read_raster(png_bytes(twelve_bit))
    assert frame.pixels.dtype == np.uint8 and frame.pixels.max() == 255 and frame.pixels.min() == 0
    assert abs(int(frame.pixels[48, 48]) - 128) <= 2  # mid-range stays mid-grey (a >> 8 would give ~8)
    full = read_raster(png_bytes((twelve_bit.astype(np.uint32) * 16).astype(np.uint16)))
    assert full.pixels.max() == 255


def test_raster_formats_and_gif_first_frame(tmp_path):
    rng = np.random.default_rng(0)
    rgb = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    gray = rgb[..., 0]
    for fmt, kw in (("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {})):
        assert np.array_equal(read_raster(png_bytes(rgb, fmt, **kw)).pixels, rgb)
    assert read_raster(png_bytes(np.stack([gray] * 3, -1), "PNG")).pixels.ndim == 2  # gray stored as RGB
    first, second = Image.fromarray(gray).convert("P"), Image.fromarray(255 - gray).convert("P")
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second])
    out = decode_file(path).frames
    assert len(out) == 1 and abs(float(out[0].pixels.mean()) - float(np.asarray(first.convert("L")).mean())) < 1


def test_bad_raster_files_are_rejected_with_reasons(tmp_path):
    (tmp_path / "text.jpg").write_text("hello, not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    data = png_bytes((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    expected = {"text.jpg": readers.NOT_AN_IMAGE, "empty.png": readers.UNREADABLE, "cut.jpg": readers.UNREADABLE}
    for name, reason in expected.items():
        with pytest.raises(Rejected) as info:
            decode_file(tmp_path / name)
        assert info.value.reason == reason


def test_dicom_rescale_then_window():
    hu = np.array([[-1000, 0, 40, 80, 500, 40]], dtype=np.int32)
    decoded = read_dicom(ct((hu + 1024).astype(np.uint16)))
    px = decoded.frames[0].pixels[0]
    assert px[0] == 0 and px[1] == 0 and px[4] == 255 and px[3] == 255
    assert abs(int(px[2]) - 130) <= 2  # window centre (PS3.3 linear: (40 - 39.5) / 79 + 0.5)
    assert decoded.frames[0].meta == {"modality": "CT"}


def test_dicom_monochrome1_is_inverted_and_frames_are_split():
    values = np.array([[[0, 4095]], [[4095, 0]]], dtype=np.uint16)
    decoded = read_dicom(ct(values, photometric="MONOCHROME1", window=None, intercept=0, frames=2))
    assert len(decoded.frames) == 2
    assert decoded.frames[0].pixels.tolist() == [[255, 0]] and decoded.frames[1].pixels.tolist() == [[0, 255]]


def test_dicom_voi_lut_sequence_wins_over_the_window():
    lut = [0, 50, 100, 255]  # 8-bit output, first mapped value 0
    decoded = read_dicom(ct(np.array([[1024, 1025, 1026, 1027]], np.uint16), window=(0, 1), voi_lut=lut))
    assert decoded.frames[0].pixels.tolist() == [[0, 50, 100, 255]]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_dicom_phi_is_hashed_and_only_whitelisted_fields_pass():
    data = ct(np.full((4, 4), 1100, np.uint16), PatientName="Doe^Jane", PatientID="PID778899",
              PatientBirthDate="19700101", BodyPartExamined="CHEST", InstitutionName="Somewhere")
    decoded = read_dicom(data)
    assert decoded.frames[0].meta == {"modality": "CT", "body_part": "CHEST"}
    assert readers.token_hash("pid778899") in decoded.phi_tokens and readers.token_hash("jane") in decoded.phi_tokens
    assert not any("jane" in t or "778899" in t for t in decoded.phi_tokens)
    odd = read_dicom(ct(np.full((4, 4), 1100, np.uint16), BodyPartExamined="Jane Doe's knee"))
    assert "body_part" not in odd.frames[0].meta  # not a DICOM code string: dropped


def test_dicom_undecodable_compression_and_no_pixels(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no pixel decoder exists
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(Rejected) as info:
        read_dicom(buf.getvalue())
    assert info.value.reason == readers.DICOM_UNDECODABLE and "MPEG2" in info.value.detail
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(Rejected) as info:
        read_dicom(buf.getvalue())
    assert info.value.reason == readers.DICOM_NO_PIXELS


def test_pydicom_bundled_files_decode():
    from pydicom.data import get_testdata_file

    for name, shape in (("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64))):
        decoded = decode_file(get_testdata_file(name))
        assert decoded.frames[0].pixels.shape == shape and decoded.frames[0].pixels.std() > 10


def nifti_bytes(vol: np.ndarray, affine=None) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(vol, np.eye(4) if affine is None else affine).to_bytes()


def test_nifti_slices_axes_and_empty_slices():
    vol = np.zeros((40, 50, 6), np.float32)
    vol[5:35, 10:45, 1:5] = np.arange(4, dtype=np.float32) + 1  # slices 0 and 5 empty
    vol[5:35, 10:45, 1:5] *= np.linspace(0.5, 1, 35)[None, :, None]
    axial = read_nifti(nifti_bytes(vol))
    assert [f.index for f in axial.frames] == [1, 2, 3, 4]
    assert axial.rejected == [(0, readers.EMPTY_SLICE), (5, readers.EMPTY_SLICE)]
    assert axial.frames[0].pixels.shape == (50, 40)  # rows: anterior (y) up, columns: x
    column = axial.frames[0].pixels[:, 20]
    assert column[0] == 0 and column[5] > column[39] > 0  # row 5 is y = 44 (anterior, brightest) on top
    coronal = read_nifti(nifti_bytes(vol), axis="coronal")
    assert coronal.frames[0].pixels.shape == (6, 40)
    flipped = read_nifti(nifti_bytes(vol[::-1], np.diag([-1.0, 1, 1, 1])))  # LAS storage -> same RAS image
    assert np.array_equal(flipped.frames[0].pixels, axial.frames[0].pixels)
    every_other = read_nifti(nifti_bytes(vol), step=2)
    assert [f.index for f in every_other.frames] == [2, 4]
