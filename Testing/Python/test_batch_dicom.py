"""Batch on the real abdominal CT DICOM series (../shared/data/totalseg_ct_dicom): series discovery in a DICOM tree,
the shipped slices network run by the batch, and its DICOM SEG read back with highdicom and pydicom, geometry
checked against the source series, with an oblique copy of the series (headers rotated) as well."""

from pathlib import Path

import numpy as np
import pytest

from conftest import oblique_direction

pytestmark = pytest.mark.usefixtures("one_torch_thread")
hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def series(tmp_path_factory, request):
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "totalseg_ct_dicom" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"the real CT DICOM series {folder} is not present")
    return folder


def oblique_copy(src_folder, dst, rotation):
    """The series with its planes turned by ``rotation`` about its centre (headers only; pixels untouched) and the
    blank study / series / frame-of-reference / SOP UIDs of this anonymised series filled in."""
    from pydicom.uid import generate_uid

    files = sorted(src_folder.iterdir())
    sets = [pydicom.dcmread(f) for f in files]
    centre = np.mean([np.asarray(d.ImagePositionPatient, float) for d in sets], axis=0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    dst.mkdir(parents=True)
    for n, d in enumerate(sets):
        iop = np.asarray(d.ImageOrientationPatient, float)
        d.ImageOrientationPatient = [round(float(v), 8) for v in np.r_[rotation @ iop[:3], rotation @ iop[3:]]]
        d.ImagePositionPatient = [round(float(v), 4) for v in
                                  rotation @ (np.asarray(d.ImagePositionPatient, float) - centre) + centre]
        d.SOPClassUID, d.SOPInstanceUID = d.file_meta.MediaStorageSOPClassUID, d.file_meta.MediaStorageSOPInstanceUID
        d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID = study, series, frame
        d.save_as(dst / f"IM{n:03d}.dcm")
    return dst


def check_seg(seg_path, case_files, labelmap, segments):
    """The SEG against its source series: references, plane orientation and positions, spacing, codes, and every
    voxel compared in LPS with the engine's labelmap."""
    ds = pydicom.dcmread(seg_path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in case_files]
    uid = lambda d: str(d.SOPInstanceUID or d.file_meta.MediaStorageSOPInstanceUID)  # noqa: E731
    by_uid = {uid(d): d for d in src}
    ref = ds.ReferencedSeriesSequence[0]
    if str(src[0].SeriesInstanceUID):
        assert ref.SeriesInstanceUID == src[0].SeriesInstanceUID and ds.StudyInstanceUID == src[0].StudyInstanceUID
        assert ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == set(by_uid)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, src[0].ImageOrientationPatient)
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, src[0].PixelSpacing)
    assert len(ds.PerFrameFunctionalGroupsSequence) > 0
    for frame in ds.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                           by_uid[source].ImagePositionPatient, atol=1e-3)
    # labels, codes, colours
    items = list(ds.SegmentSequence)
    assert [s.SegmentLabel for s in items] == [s.name for s in segments]
    for item, s in zip(items, segments):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        want = s.terminology.split("~")[2].split("^") if s.terminology else ["SCT", "85756007"]
        assert (code.CodingSchemeDesignator, code.CodeValue) == (want[0], want[1])
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(np.asarray(rgb) / 255.0, s.color, atol=0.02)
    # voxels: highdicom's volume (its own affine, LPS) against the engine's labelmap (its own ijk -> LPS)
    seg = hd.seg.segread(seg_path)
    vol = seg.get_volume(combine_segments=True)
    number = {s.name: n for n, s in enumerate(segments, start=1)}
    want = np.zeros(labelmap.array.shape, np.int32)
    for s in segments:
        want[labelmap.array == s.label] = number[s.name]
    k, j, i = np.nonzero(np.ones(labelmap.array.shape, bool))
    lps = labelmap.ijk_to_lps() @ np.stack([i, j, k, np.ones_like(i)]).astype(float)
    idx = np.rint(np.linalg.inv(vol.affine) @ lps)[:3].astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(vol.array.shape)[:, None]), axis=0)
    got = np.zeros(want.size, np.int32)
    got[inside] = vol.array[idx[0, inside], idx[1, inside], idx[2, inside]]
    assert np.array_equal(got, want.ravel()), "the SEG voxels are not where the engine's labels are"
    return ds


def test_slices_batch_dicom_seg(series, tmp_path, monkeypatch):
    """Two CT series in a DICOM tree (the real one as stored, and an oblique copy): one batch, the model loaded
    once, one DICOM SEG per series on its geometry."""
    import json

    import deepsegrecon.slices.task as slices_task
    from deepsegrecon import batch
    from deepsegrecon.batch_cases import find_images
    from deepsegrecon.io import read_image
    from deepsegrecon.runner import run

    tree = tmp_path / "tree"
    (tree / "patient").mkdir(parents=True)
    (tree / "patient" / "ct").symlink_to(series, target_is_directory=True)
    oblique_copy(series, tree / "patient_oblique" / "ct", oblique_direction())
    (tree / "patient" / "notes.txt").write_text("not DICOM")
    cases = find_images([tree])  # one case per CT series in the tree
    assert [c.id for c in cases] == ["patient_ct", "patient_oblique_ct"]
    assert all(len(c.files["image"]) == 20 for c in cases)
    loads = []
    original = slices_task.load_model
    monkeypatch.setattr(slices_task, "load_model", lambda entry: loads.append(entry.version) or original(entry))
    out = tmp_path / "out"
    s = batch.run_batch("slices", [tree], out, {"device": "cpu", "batch": 4})
    assert s.done == 2, s.records
    assert len(loads) == 1  # the model is built once for the whole batch
    rows = batch.read_csv(out)
    assert [r["status"] for r in rows] == ["done", "done"] and all("liver" in r["summary"] for r in rows)
    for case in cases:
        seg_path = out / case.id / f"{case.id}.seg.dcm"
        assert seg_path.is_file() and not list((out / case.id).glob("*.seg.nrrd"))
        repairs = json.loads((out / case.id / "report.json").read_text()).get("dicom_seg_repairs", [])
        assert bool(repairs) == (case.id == "patient_ct")  # the stored series has blank UIDs (anonymised)
        image = read_image(case.inputs["image"])
        if "oblique" in case.id:
            assert np.allclose(image.direction[:, :2], oblique_direction()[:, :2], atol=1e-6)
        # the engine's result, for the voxel comparison: the same task in this process
        result = run("slices", {"image": image}, {"device": "cpu", "batch": 4})
        segments = [x for x in result.segments if np.any(result.labelmap.array == x.label)]
        assert {x.name for x in segments} >= {"liver", "spleen"}  # organs of this abdominal slab
        ds = check_seg(seg_path, case.files["image"], result.labelmap, segments)
        liver = next(x for x in ds.SegmentSequence if x.SegmentLabel == "liver")
        assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
        flipped = result.labelmap.with_array(result.labelmap.array[::-1].copy())
        with pytest.raises(AssertionError, match="not where"):  # the voxel check sees a slice-order error
            check_seg(seg_path, case.files["image"], flipped, segments)


def write_dicom_series(image, folder, modality="CT", description="teeth phantom", study=None):
    """A series of ``image`` (int16, one file a slice) with SimpleITK, its planes on the image's direction."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    img = sitk.Cast(image.to_sitk(), sitk.sitkInt16)
    d = img.GetDirection()
    study, series, frame = study or generate_uid(), generate_uid(), generate_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {"0008|0060": modality, "0020|000d": study, "0020|000e": series, "0020|0052": frame,
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": generate_uid(), "0020|0013": str(k + 1),
                "0010|0020": "PHANTOM", "0008|103e": description,
                "0018|0088": "1",  # a wrong SpacingBetweenSlices, as some scanners write: not to be copied
                "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_teeth_dicom_seg_codes_on_an_oblique_series(tmp_path):
    """A teeth segmentation (the phantom's ground truth) as DICOM SEG of an oblique CT series written by
    SimpleITK: FDI numbers as tracking IDs, tooth codes with left/right, jaw codes, geometry and voxels."""
    from deepsegrecon.batch_cases import find_images
    from deepsegrecon.dicomseg import write_dicom_seg
    from deepsegrecon.io import read_image
    from deepsegrecon.results import SegmentationResult
    from deepsegrecon.segio import read_seg_nrrd
    from deepsegrecon.teeth.phantom import write_phantom

    write_phantom(5, tmp_path / "ph", shape=(48, 44, 32))
    cbct, truth = read_image(tmp_path / "ph" / "cbct.nrrd"), read_seg_nrrd(tmp_path / "ph" / "labels.seg.nrrd")
    cbct.direction = oblique_direction((0.2, 0.1, -0.3))
    write_dicom_series(cbct, tmp_path / "dicom" / "cbct")
    (case,) = find_images([tmp_path / "dicom"])
    image = read_image(case.inputs["image"])
    assert np.allclose(image.direction, cbct.direction, atol=1e-5) and np.allclose(image.origin, cbct.origin)
    result = SegmentationResult(image.with_array(truth.labelmap.array.astype(np.uint8)), truth.segments)
    write_dicom_seg(result, case.files["image"], tmp_path / "teeth.seg.dcm")
    assert any("SpacingBetweenSlices 1 replaced" in r for r in result.report["dicom_seg_repairs"])
    segments = [s for s in truth.segments if np.any(truth.labelmap.array == s.label)]
    ds = check_seg(tmp_path / "teeth.seg.dcm", case.files["image"], result.labelmap, segments)
    items = {x.SegmentLabel: x for x in ds.SegmentSequence}
    tooth = items["tooth_11"]
    assert tooth.TrackingID == "FDI 11" and tooth.SegmentedPropertyTypeCodeSequence[0].CodeValue == "38199008"
    assert tooth.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning \
        == "Right"
    left = items["tooth_21"].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert left.CodeMeaning == "Left"
    assert items["mandible"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "91609006"


def test_brain_studies_matched_by_series_description(tmp_path):
    """A DICOM tree of two MR studies (four and two sequences) and a CT: one brain case per study, each input
    the series whose description names its sequence."""
    from pydicom.uid import generate_uid

    from deepsegrecon.batch_cases import find_brain
    from deepsegrecon.image import Image

    img = Image(np.zeros((3, 8, 8), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    studies = {"a": ("T1 SE", "T1 SE +C post contrast", "T2 TSE", "FLAIR axial"), "b": ("t2_flair", "T1_gad")}
    for name, descriptions in studies.items():
        uid = generate_uid()
        for n, desc in enumerate(descriptions):
            write_dicom_series(img, tmp_path / "pacs" / name / f"s{n}", "MR", desc, study=uid)
    write_dicom_series(img, tmp_path / "pacs" / "a" / "ct", "CT", "T1 looking CT")
    cases = find_brain([tmp_path / "pacs"])
    got = sorted({m: Path(p).name for m, p in c.inputs.items()}.items() for c in cases)
    want = sorted([{"t1": "s0", "t1c": "s1", "t2": "s2", "flair": "s3"}.items(), {"flair": "s0", "t1c": "s1"}.items()])
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    assert all(len(c.files[m]) == 3 for c in cases for m in c.inputs)
