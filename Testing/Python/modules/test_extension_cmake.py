"""Configure, build and install the extension's CMake project against a stand-in Slicer package.

A real Slicer build tree is far too large for CI, so ``find_package(Slicer)`` finds a small SlicerConfig.cmake
written here that provides what an extension uses, with the semantics of Slicer 5 / CTK:

- ``slicerMacroBuildScriptedModule``: SCRIPTS and RESOURCES must exist relative to the module folder; each is
  copied to ``<build>/<Slicer_QTSCRIPTEDMODULES_LIB_DIR>/<same relative path>`` (so a path with ``..`` or an
  absolute path would land in the wrong place: refused here);
- ``ctkMacroCompilePythonScript``: the same copy rule, and ``install(DIRECTORY <dest>/)``;
- ``slicer_add_python_unittest(SCRIPT x.py)``: the script must exist in the current source folder.

The test then checks the build and install trees: every module script, its .ui and icon where
``ScriptedLoadableModuleWidget.resourcePath`` and the automatic module icon look for them, and the whole engine
package beside the modules, importable from there.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LIB_DIR = "lib/Slicer-5.9/qt-scripted-modules"
REQUIREMENT_FILES = ("requirements.lock", "requirements-nodeps.txt")

SLICER_CONFIG = r"""
set(Slicer_FOUND TRUE)
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "@LIB_DIR@")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
"""

USE_SLICER = r"""
if(NOT DEFINED EXTENSION_NAME)
  set(EXTENSION_NAME ${PROJECT_NAME})
endif()
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(BUILD_TESTING ON)

function(_fake_check_relative what file)
  if(IS_ABSOLUTE "${file}" OR "${file}" MATCHES "(^|/)\\.\\.(/|$)")
    message(FATAL_ERROR "${what} '${file}': CTK copies it to <destination>/${file}, which must stay inside it")
  endif()
endfunction()

function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
    "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(var TARGET_NAME SCRIPTS DESTINATION_DIR INSTALL_DIR)
    if(NOT DEFINED MY_${var})
      message(FATAL_ERROR "ctkMacroCompilePythonScript: ${var} is mandatory")
    endif()
  endforeach()
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  set(copied)
  foreach(file IN LISTS MY_SCRIPTS MY_RESOURCES)
    if(file IN_LIST MY_SCRIPTS AND NOT file MATCHES "\\.py$")
      set(file "${file}.py")
    endif()
    _fake_check_relative("script or resource" "${file}")
    if(NOT EXISTS "${MY_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "ctkMacroCompilePythonScript: ${MY_SOURCE_DIR}/${file} does not exist")
    endif()
    set(tgt "${MY_DESTINATION_DIR}/${file}")
    add_custom_command(OUTPUT "${tgt}" COMMAND ${CMAKE_COMMAND} -E copy "${MY_SOURCE_DIR}/${file}" "${tgt}"
      DEPENDS "${MY_SOURCE_DIR}/${file}" VERBATIM)
    list(APPEND copied "${tgt}")
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonFiles ALL DEPENDS ${copied})
  set(dir "${MY_DESTINATION_DIR}")
  if(MY_NO_INSTALL_SUBDIR)
    set(dir "${MY_DESTINATION_DIR}/")
  endif()
  install(DIRECTORY "${dir}" DESTINATION "${MY_INSTALL_DIR}" COMPONENT RuntimeLibraries USE_SOURCE_PERMISSIONS)
endfunction()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  foreach(value IN LISTS MY_SLICER_SCRIPTS MY_SLICER_RESOURCES)
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${value}" AND NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${value}.py")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${value}'")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(TARGET_NAME ${MY_SLICER_NAME} SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
  set_property(GLOBAL APPEND PROPERTY FAKE_SLICER_MODULES "${MY_SLICER_NAME}")
  if(MY_SLICER_WITH_GENERIC_TESTS)
    set_property(GLOBAL APPEND PROPERTY FAKE_SLICER_GENERIC_TESTS "${MY_SLICER_NAME}")
  endif()
endmacro()

function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT}")
    message(FATAL_ERROR "slicer_add_python_unittest: ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT} does not exist")
  endif()
  set_property(GLOBAL APPEND PROPERTY FAKE_SLICER_UNITTESTS "${MY_SCRIPT}")
endfunction()
"""

GENERATE_CONFIG = r"""
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
            EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "${var} is not set")
  endif()
endforeach()
get_property(modules GLOBAL PROPERTY FAKE_SLICER_MODULES)
get_property(generic GLOBAL PROPERTY FAKE_SLICER_GENERIC_TESTS)
get_property(unittests GLOBAL PROPERTY FAKE_SLICER_UNITTESTS)
file(WRITE "${CMAKE_BINARY_DIR}/fake-slicer-summary.txt"
  "name=${EXTENSION_NAME}\ncategory=${EXTENSION_CATEGORY}\ndepends=${EXTENSION_DEPENDS}\n"
  "modules=${modules}\ngeneric_tests=${generic}\nunittests=${unittests}\n")
"""


def module_names():
    base = ROOT / "DeepSegRecon"
    return sorted(p.name for p in base.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
        pytest.skip("no C++ compiler: project() cannot be configured (a Slicer extension build needs one)")
    tmp = tmp_path_factory.mktemp("extension-build")
    fake = tmp / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(SLICER_CONFIG.replace("@LIB_DIR@", LIB_DIR))
    (fake / "UseSlicer.cmake").write_text(USE_SLICER)
    (fake / "SlicerExtensionGenerateConfig.cmake").write_text(GENERATE_CONFIG)
    (fake / "SlicerExtensionCPack.cmake").write_text("# packaging is not exercised here\n")
    build, install = tmp / "build", tmp / "install"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}

    def run(*args):
        proc = subprocess.run([cmake, *args], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"cmake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    run("-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}", "-DCMAKE_BUILD_TYPE=Release")
    run("--build", str(build))
    run("--install", str(build), "--prefix", str(install))
    return {"build": build / LIB_DIR, "install": install / LIB_DIR, "summary": (build / "fake-slicer-summary.txt")}


def expected_files() -> set:
    """Every file the built extension must contain, relative to the scripted-modules folder."""
    files = set()
    for module in module_names():
        files.add(f"{module}.py")
        files.add(f"Resources/UI/{module}.ui")
        files.add(f"Resources/Icons/{module}.png")
    files.add("Resources/Icons/DeepSegRecon.png")
    for name in REQUIREMENT_FILES:  # what DeepSegReconCommon/Dependencies.py reads inside Slicer
        files.add(f"Resources/Requirements/{name}")
    engine = ROOT / "DeepSegRecon"
    for p in (engine / "deepsegrecon").rglob("*"):
        rel = p.relative_to(engine)
        if p.is_file() and "__pycache__" not in rel.parts and p.suffix not in (".pyc", ".pyo") \
                and not any(part.startswith(".") for part in rel.parts):
            files.add(str(rel))
    for sub in ("Models", "Data"):
        folder = ROOT / "Resources" / sub
        if folder.is_dir():
            for p in folder.rglob("*"):
                rel = p.relative_to(ROOT)
                if p.is_file() and not any(part.startswith(".") for part in rel.parts) \
                        and "__pycache__" not in rel.parts:
                    files.add(str(rel))
    return files


@pytest.mark.parametrize("tree", ["build", "install"])
def test_extension_tree_has_modules_resources_and_engine(built, tree):
    base = built[tree]
    present = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}
    missing = sorted(expected_files() - present)
    assert not missing, f"missing from the {tree} tree: {missing[:20]}"
    for rel in expected_files():  # copies, not something else
        if rel.startswith("Resources/Requirements/"):
            src = ROOT / rel[len("Resources/Requirements/"):]
        elif rel.startswith("Resources/"):
            src = ROOT / "Resources" / rel[len("Resources/"):]
        elif rel.startswith("deepsegrecon/"):
            src = ROOT / "DeepSegRecon" / rel
        elif rel.endswith(".py"):
            src = ROOT / "DeepSegRecon" / rel[:-3] / rel
        assert (base / rel).read_bytes() == src.read_bytes(), rel


def test_slicer_registration(built):
    summary = dict(line.split("=", 1) for line in built["summary"].read_text().splitlines() if "=" in line)
    assert summary["name"] == "DeepSegRecon"
    assert summary["category"] == "Segmentation"
    assert summary["depends"] == "PyTorch"  # its PyTorchUtils installs the torch build that fits the computer
    assert sorted(summary["modules"].split(";")) == module_names()
    assert sorted(summary["generic_tests"].split(";")) == module_names()
    assert sorted(summary["unittests"].split(";")) == [f"{m}.py" for m in module_names()]


def test_installed_engine_imports_from_the_scripted_modules_folder(built):
    """What the module does at load (sys.path entry for the installed engine) works on the install tree."""
    base = built["install"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import deepsegrecon, deepsegrecon.preview, "
            "deepsegrecon.worker; print(deepsegrecon.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(base)], capture_output=True, text=True, env=env,
                          cwd=str(base), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().is_relative_to(base.resolve())


def test_installed_dependency_manager_reads_the_installed_lock(built):
    """Inside Slicer, DeepSegReconCommon/Dependencies.py finds the lock files installed beside it, and derives
    every module's package list from them."""
    base = built["install"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from DeepSegReconCommon import Dependencies as D; "
            "print(D.requirementFile('requirements.lock')); print(D.requirementFile('requirements-nodeps.txt')); "
            "print(sorted(r for m in D.MODULE_PACKAGES for r in sum(D.requirements(m), []))[:3])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(base)], capture_output=True, text=True, env=env,
                          cwd=str(base), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lock, nodeps, _ = proc.stdout.splitlines()
    assert Path(lock) == base / "Resources" / "Requirements" / "requirements.lock"
    assert Path(nodeps) == base / "Resources" / "Requirements" / "requirements-nodeps.txt"
