"""The Slicer Extensions Index checks that can run offline, on the catalogue entry drafted in
``ExtensionsIndex/DeepSegRecon.json`` and on the top-level ``CMakeLists.txt``.

The index's ``scripts/check_description_files.py`` (Slicer/ExtensionsIndex) clones the repository and checks: the JSON
against its ``$schema``, the category against its list of accepted categories, the repository name (contains
"slicer"), the ``scm_url`` scheme, ``project()`` against the JSON file name, ``EXTENSION_ICONURL`` and
``EXTENSION_SCREENSHOTURLS`` (read with its own regular expressions: plain ``http`` URLs to images) and a license
file at the root. Here the same rules run on the working tree: a URL is checked against the file it names in this
repository instead of being downloaded. The schema (catalogue entry v1.0.1) and the category list are copied below.
The pull-request checklist adds: a 1-2 sentence description, a homepage that names and describes every module, and
the license named in the README.
"""

import ast
import json
import re
import urllib.parse as urlparse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODULES_DIR = ROOT / "DeepSegRecon"
ENTRY = ROOT / "ExtensionsIndex" / "DeepSegRecon.json"

# https://github.com/Slicer/Slicer/blob/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
SCHEMA_ENUMS = {"scm_type": ("git", "local"), "tier": (1, 3, 5)}

# ACCEPTED_EXTENSION_CATEGORIES of the index's scripts/check_description_files.py
ACCEPTED_EXTENSION_CATEGORIES = (
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda", "Converters",
    "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation", "Filtering",
    "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "IGT", "Informatics", "Netstim",
    "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology", "Photogrammetry",
    "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration", "Remote", "Rendering",
    "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression", "Shape Visualization", "Simulation",
    "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound", "Utilities",
    "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools", "Wizards",
)
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")

# the index's own regular expressions for the top-level CMakeLists.txt
PROJECT_RE = r"project\s*\(\s*([^\s\)\n\r]+)"
ICON_RE = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOTS_RE = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
IMAGE_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


@pytest.fixture(scope="module")
def entry():
    return json.loads(ENTRY.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cmake():
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def _cmake_value(text, var):
    m = re.search(r'set\s*\(' + var + r'\s+"([^"]*)"\s*\)', text)
    assert m, f"set({var} \"...\") not found in CMakeLists.txt"
    return m.group(1)


def _modules():
    """{folder name: title} of every module folder (DeepSegRecon/<M>/<M>.py), titles read with ast."""
    out = {}
    for py in sorted(MODULES_DIR.glob("*/*.py")):
        if py.stem != py.parent.name:
            continue
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                    and node.targets[0].attr in ("title", "categories", "contributors")
                    and isinstance(node.targets[0].value, ast.Attribute) and node.targets[0].value.attr == "parent"):
                out.setdefault(py.stem, {})[node.targets[0].attr] = ast.literal_eval(node.value)
    return out


def test_license_file_is_apache_2(cmake):
    found = [n for n in LICENSE_FILE_NAMES if (ROOT / n).is_file()]
    assert found == ["LICENSE"], found
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    for words in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND "
                  "DISTRIBUTION", "END OF TERMS AND CONDITIONS"):
        assert words in text, words
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^## License\s+Apache License 2\.0", readme, re.M), "the README names the license"


def test_entry_matches_the_catalogue_schema(entry):
    assert ENTRY.name == "DeepSegRecon.json"
    for key in SCHEMA_REQUIRED:
        assert key in entry, f"{key} is required"
    unknown = set(entry) - set(SCHEMA_PROPERTIES)
    assert not unknown, f"the schema allows no other keys: {sorted(unknown)}"
    for key, value in entry.items():
        assert type(value) is SCHEMA_PROPERTIES[key], (key, value)
        if key in SCHEMA_ENUMS:
            assert value in SCHEMA_ENUMS[key], (key, value)
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    assert entry["$schema"] == SCHEMA_URL


def test_category_is_accepted_and_the_modules_sit_under_it(entry, cmake):
    assert entry["category"] in ACCEPTED_EXTENSION_CATEGORIES
    assert _cmake_value(cmake, "EXTENSION_CATEGORY") == entry["category"] == "Segmentation"
    for name, info in _modules().items():
        # Slicer nests module categories at "."; every module in the extension's sub-menu of its category
        assert info["categories"] == [f"{entry['category']}.DeepSegRecon"], name


def test_repository_url_name_and_revision(entry, cmake):
    url = urlparse.urlsplit(entry["scm_url"])
    assert "://" in entry["scm_url"] and url.scheme in ("git", "https")
    repo = Path(url.path).stem
    assert "slicer" in repo.lower(), f"the index asks for a repository named Slicer<Extension>, not {repo}"
    assert re.findall(PROJECT_RE, cmake, re.I | re.M)[0] == ENTRY.stem  # project() is the JSON file's name
    assert entry["scm_revision"] == "main" and entry.get("build_subdirectory", ".") == "."
    depends = _cmake_value(cmake, "EXTENSION_DEPENDS")
    assert entry.get("build_dependencies", []) == ([] if depends == "NA" else depends.split())


def _local_file(url, entry):
    """The file in this repository that a raw.githubusercontent.com URL of the entry's repository names."""
    parts = urlparse.urlsplit(url)
    owner_repo = urlparse.urlsplit(entry["scm_url"]).path.strip("/")
    prefix = f"/{owner_repo}/{entry['scm_revision']}/"
    assert parts.scheme == "https" and parts.netloc == "raw.githubusercontent.com", url
    assert parts.path.startswith(prefix), f"{url} is not a file of {entry['scm_url']} at {entry['scm_revision']}"
    return ROOT / parts.path[len(prefix):]


def _assert_image(path):
    assert path.is_file(), f"{path} does not exist"
    magic = IMAGE_MAGIC.get(path.suffix.lower())
    assert magic is not None, f"{path.name}: not a .png/.jpg/.gif"
    assert path.read_bytes().startswith(magic), f"{path.name} is not the image its extension says"


def test_icon_and_screenshots_are_plain_urls_of_images_in_the_repository(entry, cmake):
    icons = re.findall(ICON_RE, cmake, re.I | re.M)
    assert icons and icons[0].startswith("http"), "EXTENSION_ICONURL must be a plain URL (no CMake variable)"
    _assert_image(_local_file(icons[0], entry))
    shots = re.findall(SCREENSHOTS_RE, cmake, re.I | re.M)
    assert shots, "EXTENSION_SCREENSHOTURLS not found with the index's pattern"
    urls = shots[0].split()
    assert urls and all(u.startswith("http") for u in urls)
    for url in urls:
        _assert_image(_local_file(url, entry))


def test_homepage_and_contributors(entry, cmake):
    homepage = _cmake_value(cmake, "EXTENSION_HOMEPAGE")
    assert homepage.startswith(entry["scm_url"]) and homepage.endswith("#readme")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# DeepSegRecon")
    for name, info in _modules().items():
        assert f"**{info['title']}" in readme, f"the homepage (README) does not describe {info['title']}"
        assert info["contributors"] and all(c.strip() for c in info["contributors"]), name
    assert _cmake_value(cmake, "EXTENSION_CONTRIBUTORS").strip()


def test_description_is_short_and_names_every_module(cmake):
    text = _cmake_value(cmake, "EXTENSION_DESCRIPTION")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip()) if s]
    assert 1 <= len(sentences) <= 2, f"the index asks for 1-2 sentences, got {len(sentences)}"
    assert 100 <= len(text) <= 800, len(text)
    for _name, info in _modules().items():
        assert info["title"] in text, f"the description does not mention {info['title']}"


def test_every_module_is_listed_in_cmake():
    folders = sorted(_modules())
    assert len(folders) == 5, folders
    listed = re.findall(r"^add_subdirectory\((\w+)\)", (MODULES_DIR / "CMakeLists.txt").read_text(), re.M)
    assert sorted(listed) == folders
    for name in folders:
        text = (MODULES_DIR / name / "CMakeLists.txt").read_text(encoding="utf-8")
        assert re.search(r"set\(MODULE_NAME\s+" + name + r"\)", text), name
