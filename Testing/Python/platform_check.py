"""Does every module's package list install on Slicer 5.10's Python 3.12, on Linux, Windows and macOS?

For each module (``DeepSegReconCommon.Dependencies``) and platform, ``uv pip install --dry-run --python-version 3.12
--python-platform <p> --only-binary :all:`` resolves what a fresh Slicer would install: the module's requirements
with the constraints the dependency manager writes (the locked versions of what they pull in; numpy at the locked
version standing in for Slicer's own) and torch >= ``TORCH_MINIMUM`` (PyTorchUtils picks the build inside Slicer);
then the ``--no-deps`` packages alone. Wheels only: nothing may need a compiler on the user's machine.

    python Testing/Python/platform_check.py        # make check-platforms; exit 1 when one does not resolve

``uv`` is found on PATH, as ``$UV``, or in ~/.local/bin. Needs the package index.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DeepSegRecon"))

from DeepSegReconCommon import Dependencies as D  # noqa: E402

PLATFORMS = {"Linux (manylinux x86_64)": "x86_64-manylinux_2_28", "Windows (win_amd64)": "x86_64-pc-windows-msvc",
             "macOS arm64 (13+)": "aarch64-apple-darwin"}
PYTHON = ".".join(map(str, D.PYTHON_VERSION))
NETWORK_ERRORS = re.compile(r"(Failed to fetch|Could not connect|error sending request|dns error|timed out|"
                            r"Connection refused|network is unreachable|tcp connect error)", re.I)


def findUv():
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(Path.home() / ".local" / "bin" / "uv")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def run(uv, args, timeout=300):
    """(return code, output) of ``uv <args>``. Never a Python download: uv would fetch a 3.12 to build sdists (wheels
    only here) and, offline, spend 8 s a call on retries."""
    proc = subprocess.run([uv, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"})
    return proc.returncode, proc.stdout + proc.stderr


def moduleInputs(moduleName, pins):
    """(requirements lines, constraints lines, no-deps lines) of a fresh Slicer install of ``moduleName``."""
    normal, noDeps = D.requirements(moduleName, pins=pins)
    constraints = D.Plan(moduleName, installed=lambda name: None, pins=pins).constraints
    constraints.append(f"numpy=={pins[0]['numpy']}")  # Slicer's own numpy, kept by the install
    return normal + [f"torch>={D.TORCH_MINIMUM}"], constraints, noDeps


def dryRun(uv, platform, requirements, constraints, folder, noDeps=False):
    """(ok, {name: version} or the error text) of installing ``requirements`` for ``platform``."""
    req = Path(folder) / "requirements.txt"
    req.write_text("\n".join(requirements) + "\n")
    args = ["pip", "install", "--dry-run", "--python-version", PYTHON, "--python-platform", platform,
            "--only-binary", ":all:", "--target", str(Path(folder) / "target"), "-r", str(req)]
    if constraints:
        con = Path(folder) / "constraints.txt"
        con.write_text("\n".join(constraints) + "\n")
        args += ["-c", str(con)]
    if noDeps:
        args.append("--no-deps")
    rc, out = run(uv, args)
    if rc != 0:
        return False, out.strip()
    return True, dict(re.findall(r"^\s*\+\s*([A-Za-z0-9._-]+)==(\S+)", out, re.M))


def resolve(uv, platform, requirements, constraints, noDeps, folder):
    """(ok, {name: version} or the error text) of a module's list, then its ``--no-deps`` packages, on ``platform``."""
    ok, detail = dryRun(uv, platform, requirements, constraints, folder)
    if ok and noDeps:
        ok2, detail2 = dryRun(uv, platform, noDeps, [], folder, noDeps=True)
        ok, detail = (True, {**detail, **detail2}) if ok2 else (False, detail2)
    return ok, detail


def check(uv, modules=None, platforms=None, log=print):
    """{(module, platform label): (ok, detail)}; ``log`` gets one line each. The resolutions wait on the index, so
    they run side by side; modules with the same list resolve once."""
    pins = D.lockPins()
    jobs = {}
    for moduleName in modules or sorted(D.MODULE_PACKAGES):
        requirements, constraints, noDeps = moduleInputs(moduleName, pins)
        for label, platform in (platforms or PLATFORMS).items():
            key = (tuple(requirements), tuple(constraints), tuple(noDeps), platform)
            jobs[moduleName, label] = key
    with tempfile.TemporaryDirectory(prefix="dsr-platforms-") as folder, ThreadPoolExecutor(6) as pool:
        futures = {key: pool.submit(resolve, uv, key[3], list(key[0]), list(key[1]), list(key[2]),
                                    tempfile.mkdtemp(dir=folder))
                   for key in dict.fromkeys(jobs.values())}
        results = {job: futures[key].result() for job, key in jobs.items()}
    for (moduleName, label), (ok, detail) in results.items():
        if ok:
            extra = "".join(f", {n} {detail[n]}" for n in ("diffdrr",) if n in detail)
            log(f"{moduleName:18s} {label:24s} ok: {len(detail)} packages (torch {detail.get('torch')}, "
                f"numpy {detail.get('numpy')}, monai {detail.get('monai')}{extra})")
        else:
            log(f"{moduleName:18s} {label:24s} FAILED:\n{detail[-2000:]}")
    return results


def main():
    uv = findUv()
    if uv is None:
        print("uv was not found (PATH, $UV, ~/.local/bin/uv): pip install uv")
        return 2
    start = time.monotonic()
    print(f"Python {PYTHON} wheels, per module and platform ({uv}):")
    results = check(uv)
    failed = [key for key, (ok, _) in results.items() if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
