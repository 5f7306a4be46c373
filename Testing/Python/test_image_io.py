"""Images keep their geometry through every reader and writer."""

import numpy as np
import pytest

from deepsegrecon.errors import InputError, ResourceError
from deepsegrecon.image import Image
from deepsegrecon.io import read_image, write_image


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_round_trip_keeps_geometry(tmp_path, oblique_image, suffix):
    path = write_image(oblique_image, tmp_path / f"vol{suffix}")
    back = read_image(path)
    assert np.array_equal(back.array, oblique_image.array)
    assert np.allclose(back.spacing, oblique_image.spacing, atol=1e-5)
    assert np.allclose(back.origin, oblique_image.origin, atol=1e-4)
    assert np.allclose(back.direction, oblique_image.direction, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [f"vol{suffix}"]  # no temp file left
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, like any file the user writes


def test_voxel_order_and_physical_points(oblique_image):
    # array[k, j, i] holds k*10000 + j*100 + i: the array is (k, j, i), sizes are (i, j, k)
    assert oblique_image.size == (11, 9, 7)
    assert oblique_image.array[2, 3, 4] == 20304
    p = oblique_image.physical_points([[4, 3, 2]])[0]
    m = oblique_image.ijk_to_lps()
    assert np.allclose(p, (m @ [4, 3, 2, 1])[:3])
    sitk_img = oblique_image.to_sitk()
    assert np.allclose(sitk_img.TransformIndexToPhysicalPoint((4, 3, 2)), p)
    ras = oblique_image.ijk_to_ras() @ [4, 3, 2, 1]
    assert np.allclose(ras[:3], p * [-1, -1, 1])
    back = Image.from_ijk_to_ras(oblique_image.array, oblique_image.ijk_to_ras())
    assert back.same_grid(oblique_image)


def test_dicom_series(shared_data):
    img = read_image(shared_data / "totalseg_ct_dicom" / "dicom")
    assert img.array.shape == (20, 512, 512)
    assert np.allclose(img.spacing[:2], 0.977, atol=0.01) and abs(img.spacing[2] - 2.0) < 0.05
    assert -1100 < img.array.min() < -900 and img.array.max() > 500  # Hounsfield units


def test_unreadable_inputs(tmp_path, oblique_image):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.nrrd")
    text = tmp_path / "notes.nrrd"
    text.write_text("this is not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_image(text)
    good = write_image(oblique_image.with_array(np.random.rand(7, 9, 11).astype(np.float32)), tmp_path / "v.nrrd", compress=False)
    data = good.read_bytes()
    trunc = tmp_path / "truncated.nrrd"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_image(trunc)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_truncated_files_refused(tmp_path, suffix):
    # ITK reads a cut NIfTI without complaint (the missing voxels come back as 0): we must not
    good = write_image(Image(np.random.rand(20, 30, 40).astype(np.float32)), tmp_path / f"v{suffix}")
    data = good.read_bytes()
    for frac in (0.5, 0.99):
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(InputError, match="truncated"):
            read_image(cut)


def test_huge_volume_refused_from_header(tmp_path):
    # a header that promises 100000^3 voxels: refused before any allocation
    hdr = tmp_path / "huge.nhdr"
    hdr.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 5000 5000 5000\nencoding: raw\nendian: little\n"
                   "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                   "space origin: (0,0,0)\ndata file: huge.raw\n")
    (tmp_path / "huge.raw").write_bytes(b"")  # the header is all that is read
    with pytest.raises(ResourceError, match="too large"):
        read_image(hdr)


def test_write_refuses_read_only_folder(readonly_dir, oblique_image):
    with pytest.raises(InputError, match="read-only"):
        write_image(oblique_image, readonly_dir / "x.nrrd")
    assert list(readonly_dir.iterdir()) == []


def test_dimensions_spacing_and_direction_checked_when_read(tmp_path):
    import SimpleITK as sitk

    one = sitk.GetImageFromArray(np.random.rand(1, 5, 6, 7).astype(np.float32), isVector=False)  # t = 1
    sitk.WriteImage(one, str(tmp_path / "t1.nrrd"))
    assert read_image(tmp_path / "t1.nrrd").array.shape == (5, 6, 7)  # a single volume in a 4-D file is fine
    many = sitk.GetImageFromArray(np.random.rand(2, 5, 6, 7).astype(np.float32), isVector=False)
    sitk.WriteImage(many, str(tmp_path / "t2.nrrd"))
    with pytest.raises(InputError, match=r"t2.nrrd is 4-D \(size 7 x 6 x 5 x 2\)"):
        read_image(tmp_path / "t2.nrrd")
    img = sitk.GetImageFromArray(np.random.rand(5, 6, 7).astype(np.float32))
    img.SetDirection((1, 0.2, 0, 0, 1, 0, 0, 0, 1))  # columns not orthogonal
    sitk.WriteImage(img, str(tmp_path / "sheared.mha"))
    with pytest.raises(InputError, match=r"not orthonormal .*\[1 0.2 0; 0 1 0; 0 0 1\]"):
        read_image(tmp_path / "sheared.mha")
    (tmp_path / "zero.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 7 6 5\nElementSpacing = 1 0 1\n"
                                       "ElementType = MET_FLOAT\nElementDataFile = zero.raw\n")
    np.zeros(210, np.float32).tofile(tmp_path / "zero.raw")
    with pytest.raises(InputError, match=r"spacing is zero or invalid \(1, 0, 1 mm\)"):
        read_image(tmp_path / "zero.mhd")
