"""The model store: versions of network weights, each with a manifest and sha256 checksums.

Layout (one folder per version)::

    <root>/<task>/<version>/manifest.json
    <root>/<task>/<version>/<weight files>

Two roots are searched: the user store (``$DEEPSEGRECON_HOME/models``, default
``~/.deepsegrecon/models``), which imports, training and removal write to, and the read-only
built-in store shipped with the extension (``Resources/Models``, or ``$DEEPSEGRECON_BUILTIN_MODELS``).
A user version shadows a built-in version of the same name.

Manifest keys: ``name``, ``task``, ``version``, ``files`` ({file name: sha256}), ``labels``,
``input_spec``, ``network`` (config to rebuild the net), ``created``, ``trained_on``,
``base_version``, ``metrics``, ``description``; optional ``default: true`` marks the version
:meth:`ModelStore.get` returns when no version is asked for (otherwise the newest). Imports add
``imported`` (when) and keep ``default`` only when asked to (``default=True``), so importing a copy of a
model never changes which version unpinned runs use.

Every version is written atomically (:meth:`ModelStore.write_version`): the files go into a hidden
staging folder beside the target, which is renamed into place only when complete, so a crash
never leaves a half-written version and never touches other versions. Hidden folders (``.*``)
are ignored when listing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, ModelError, ResourceError

MANIFEST = "manifest.json"
MANIFEST_KEYS = ("name", "task", "version", "files", "labels", "input_spec", "network", "created",
                 "trained_on", "base_version", "metrics", "description")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 600.0  # overall deadline of a download; $DEEPSEGRECON_DOWNLOAD_TIMEOUT overrides it
_DOWNLOAD_PREFIX = "deepsegrecon-download-"
_STALE_DOWNLOAD_S = 1800  # a download folder untouched this long belongs to a killed run


def default_user_root() -> Path:
    home = os.environ.get("DEEPSEGRECON_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".deepsegrecon"
    return base / "models"


def default_builtin_root() -> Path:
    env = os.environ.get("DEEPSEGRECON_BUILTIN_MODELS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(value: str, what: str) -> str:
    value = str(value)
    if not _SAFE_NAME.match(value) or value in (".", ".."):
        raise InputError(f"{what} '{value}' is not a valid name: use letters, digits, '.', '_', '+' or '-' "
                         "(starting with a letter or digit)")
    return value


def _check_file_name(value: str) -> str:
    value = str(value)
    if not value or value != Path(value).name or value.startswith(".") or value == MANIFEST:
        raise InputError(f"'{value}' cannot be a weight file name: use a plain file name (not {MANIFEST})")
    return value


def _version_key(version: str):
    """Natural order: '1.10' after '1.9'; numbers before text in each position."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version) if p]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ModelEntry:
    """One installed version: ``dir`` holds ``manifest.json`` and the weight files."""

    task: str
    version: str
    dir: Path
    manifest: dict = field(default_factory=dict)
    builtin: bool = False
    # files whose sha256 this entry has checked: {name: (size, mtime_ns)}, so one run hashes each file once
    verified: dict = field(default_factory=dict, compare=False, repr=False)
    # state dicts read by a check (runner.check_model), handed to the first load_state_dict of the file
    loaded: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def files(self) -> dict:
        return dict(self.manifest.get("files") or {})

    @property
    def is_default(self) -> bool:
        return bool(self.manifest.get("default"))

    def path(self, filename: str) -> Path:
        if filename not in self.files:
            raise ModelError(f"model {self.task} {self.version} has no file '{filename}'; "
                             f"its files are: {', '.join(self.files) or 'none'}")
        return self.dir / filename

    def __str__(self) -> str:
        return f"{self.task} {self.version}{' (built-in)' if self.builtin else ''}"


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder} has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"the manifest {path} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ModelError(f"the manifest {path} is malformed: it must be a JSON object whose 'files' maps names to sha256")
    return manifest


def entry_from_dir(folder) -> ModelEntry:
    """The model version in ``folder`` (its manifest and weight files), used as it is, outside any store."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    return ModelEntry(str(manifest.get("task")), str(manifest.get("version") or folder.name), folder, manifest)


class ModelStore:
    def __init__(self, root=None, builtin_root=None):
        self.root = Path(root).expanduser() if root is not None else default_user_root()
        self.builtin_root = Path(builtin_root).expanduser() if builtin_root is not None else default_builtin_root()

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self.root)!r}, builtin_root={str(self.builtin_root)!r})"

    # ------------------------------------------------------------------ reading
    def _roots(self):
        """(root, builtin) pairs, user store first; the same folder is searched once."""
        roots = [(self.root, False)]
        try:
            same = self.builtin_root.resolve() == self.root.resolve()
        except OSError:
            same = False
        if not same:
            roots.append((self.builtin_root, True))
        return roots

    def list(self, task: str | None = None) -> list:
        """Every installed version (of ``task``), sorted by task then version; user versions shadow built-ins."""
        if task is not None:
            task = _check_name(task, "task")
        found = {}
        for root, builtin in self._roots():
            if not root.is_dir():
                continue
            tasks = [root / task] if task else sorted(p for p in root.iterdir() if p.is_dir())
            for tdir in tasks:
                if not tdir.is_dir() or tdir.name.startswith("."):
                    continue
                for vdir in sorted(tdir.iterdir()):
                    if vdir.name.startswith(".") or not (vdir / MANIFEST).is_file():
                        continue
                    key = (tdir.name, vdir.name)
                    if key in found:
                        continue
                    try:
                        manifest = _read_manifest(vdir)
                    except ModelError as e:
                        manifest = {"task": tdir.name, "version": vdir.name, "files": {}, "error": str(e)}
                    found[key] = ModelEntry(tdir.name, vdir.name, vdir, manifest, builtin)
        return sorted(found.values(), key=lambda e: (e.task, _version_key(e.version)))

    def get(self, task: str, version: str | None = None) -> ModelEntry:
        """One version of ``task``; ``version=None`` gives the version marked default, else the newest one
        not imported (imports never change this choice unless imported as the default)."""
        entries = self.list(task)
        if not entries:
            known = sorted({e.task for e in self.list()})
            raise ModelError(
                f"no model for task '{task}' is installed (looked in {self.root} and {self.builtin_root}); "
                + (f"models exist for: {', '.join(known)}" if known else "the store is empty")
                + ". Import one with: deepsegrecon models import PATH --task " + task)
        if version is None:
            # a version marked default (a user one before a built-in one, the latest marked first)
            defaults = [e for e in entries if e.is_default]
            if defaults:
                return max(defaults, key=lambda e: (not e.builtin, str(e.manifest.get("imported") or
                                                                        e.manifest.get("created") or ""),
                                                    _version_key(e.version)))
            # else the newest version trained here or shipped; imported copies only when there is nothing
            # else, and then the first imported, so that an import never changes the choice
            own = [e for e in entries if not e.manifest.get("imported")]
            if own:
                return max(own, key=lambda e: (str(e.manifest.get("created") or ""), _version_key(e.version)))
            return min(entries, key=lambda e: (str(e.manifest["imported"]), _version_key(e.version)))
        for e in entries:
            if e.version == str(version):
                return e
        raise ModelError(f"task '{task}' has no model version '{version}'; installed versions: "
                         f"{', '.join(e.version for e in entries)}")

    def verify(self, entry: ModelEntry) -> None:
        """Check every file's sha256 against the manifest; raise ModelError naming the first bad file."""
        if "error" in entry.manifest:
            raise ModelError(entry.manifest["error"])
        for name, expected in entry.files.items():
            verify_file(entry, name, expected)

    # ------------------------------------------------------------------ writing
    def write_version(self, task: str, version: str, files: dict, manifest: dict | None = None,
                      overwrite: bool = False, move: bool = False) -> ModelEntry:
        """Install ``files`` ({name: source path}) as ``<root>/<task>/<version>``, atomically.

        Sha256 sums are computed while copying; where ``manifest['files']`` already names a sum for a
        file, a mismatch raises ModelError and nothing is written. ``move=True`` moves the sources
        instead of copying them (for temporary downloads).
        """
        task = _check_name(task, "task")
        version = _check_name(version, "version")
        manifest = dict(manifest or {})
        expected = dict(manifest.get("files") or {})
        if manifest.get("task") not in (None, task):
            raise ModelError(f"the manifest says these weights are for task '{manifest['task']}', not '{task}'")
        if not files:
            raise InputError(f"model {task} {version}: no weight files were given")
        files = {_check_file_name(n): Path(p) for n, p in files.items()}
        missing = sorted(set(expected) - set(files))
        if missing:
            raise ModelError(f"the manifest lists {', '.join(missing)} but no such file was given")
        for src in files.values():
            if not src.is_file():
                raise InputError(f"weight file {src} does not exist")
        target = self.root / task / version
        self._refuse_existing(task, version, target, overwrite)

        tdir = self.root / task
        created = [d for d in (tdir, *tdir.parents) if not d.exists()]  # removed again on failure
        try:
            tdir.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=tdir))
        except OSError as e:
            raise InputError(f"cannot write to the model store {self.root}: {e.strerror or e}") from e
        try:
            sums = {}
            for name, src in files.items():
                dst = stage / name
                if move:
                    shutil.move(str(src), dst)
                else:
                    shutil.copyfile(src, dst)
                sums[name] = sha256_file(dst)
                want = expected.get(name)
                if want and want.lower() != sums[name]:
                    raise ModelError(f"checksum mismatch for {name}: expected sha256 {want}, the file has {sums[name]}")
            manifest.update(task=task, version=version, files=sums)
            manifest.setdefault("name", f"{task} {version}")
            manifest.setdefault("created", _now())
            for key in MANIFEST_KEYS:
                manifest.setdefault(key, None)
            os.chmod(stage, 0o755)  # mkdtemp makes it private; a version folder is readable like any other
            mpath = stage / MANIFEST
            with open(mpath, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if target.exists():  # overwrite=True (checked above): swap the old version out first
                old = Path(tempfile.mkdtemp(prefix=f".old-{version}-", dir=tdir))
                os.replace(target, old / "v")
            try:
                os.rename(stage, target)
            except OSError as e:
                if old is not None:
                    os.replace(old / "v", target)
                raise ModelError(f"cannot install model {task} {version}: {e.strerror or e}") from e
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            for d in created:
                _rmdir_if_empty(d)
            raise
        return ModelEntry(task, version, target, manifest, False)

    def _refuse_existing(self, task, version, target, overwrite):
        if target.exists() and not overwrite:
            raise ModelError(f"model {task} {version} is already installed in {target.parent}; "
                             "choose another version name or remove it first")
        for root, builtin in self._roots():
            if builtin and (root / task / version / MANIFEST).is_file():
                raise ModelError(f"model {task} {version} is built in; choose another version name")

    def import_file(self, path, task: str | None = None, version: str | None = None,
                    sha256: str | None = None, overwrite: bool = False, default: bool = False,
                    **fields) -> ModelEntry:
        """Import a version folder (with ``manifest.json``) or a single weights file.

        For a folder, ``task``/``version`` default to the manifest's and each file is checked against
        its sha256 in the manifest. For a single file, ``task`` is required, ``version`` defaults to a
        timestamp, ``sha256`` (if given) must match, and ``fields`` (labels, network, description, ...)
        fill the manifest. The imported version becomes the default only with ``default=True``; a file
        that looks like an archive but is not a readable model archive is refused.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise InputError(f"{path} does not exist")
        if path.is_file() and _is_model_archive(path):
            if sha256 and sha256.strip().lower() != sha256_file(path):
                raise ModelError(f"checksum mismatch for {path.name}: expected sha256 {sha256.strip().lower()}, "
                                 f"the file has {sha256_file(path)}")
            with tempfile.TemporaryDirectory(prefix="deepsegrecon-unpack-") as tmp:
                folder = _extract_version_folder(path, Path(tmp))
                return self.import_file(folder, task=task, version=version, overwrite=overwrite, default=default,
                                        **fields)
        if path.is_dir() or path.name == MANIFEST:
            folder = path if path.is_dir() else path.parent
            manifest = _read_manifest(folder)
            mtask = manifest.get("task")
            if task and mtask and mtask != task:
                raise ModelError(f"{folder} holds weights for task '{mtask}', not '{task}'")
            task = task or mtask
            version = version or manifest.get("version")
            if not task or not version:
                raise InputError(f"{folder / MANIFEST} does not name the task and version: pass --task and --version")
            files = {}
            for name, _want in manifest.get("files", {}).items():
                src = folder / name
                if not src.is_file():
                    raise ModelError(f"{folder} is incomplete: {name}, listed in its manifest, is missing")
                files[name] = src
            manifest.update({k: v for k, v in fields.items() if v is not None})
            return self.write_version(task, version, files, _imported(manifest, default), overwrite=overwrite)
        if not task:
            raise InputError(f"importing the single file {path.name} needs the task it is for (--task)")
        _refuse_broken_archive(path)
        version = version or _dt.datetime.now().strftime("imported-%Y%m%d-%H%M%S")
        manifest = {k: v for k, v in fields.items() if v is not None}
        if sha256:
            manifest["files"] = {path.name: sha256.strip().lower()}
        manifest.setdefault("description", f"imported from {path}")
        return self.write_version(task, version, {path.name: path}, _imported(manifest, default), overwrite=overwrite)

    def import_url(self, url: str, sha256: str, task: str | None = None, version: str | None = None,
                   filename: str | None = None, timeout: float = 60.0, max_bytes: int | None = None,
                   overwrite: bool = False, default: bool = False, deadline: float | None = None,
                   **fields) -> ModelEntry:
        """Download a weights file (or a .zip/.tar.gz of a version folder), check its sha256, then install it.

        On any failure (network, checksum, archive) nothing is written to the store. A single weights
        file needs ``task``; ``version`` defaults to a timestamp (archives: to their manifest's).
        ``timeout`` bounds each network wait, ``deadline`` (seconds; default ``$DEEPSEGRECON_DOWNLOAD_TIMEOUT``
        or 10 minutes) the whole download. The temporary download folder is removed on every exit, and
        folders left by killed runs are removed at the next download.
        """
        if not sha256 or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
            raise InputError("a download needs the expected sha256 (64 hexadecimal digits) of the file")
        sha256 = sha256.strip().lower()
        task = _check_name(task, "task") if task else None
        version = _check_name(version, "version") if version else None
        if task and version:
            self._refuse_existing(task, version, self.root / task / version, overwrite)
        filename = _check_file_name(filename or urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
                                    or "weights.pt")
        deadline = download_deadline(deadline)
        _remove_stale_downloads()
        tmpdir = Path(tempfile.mkdtemp(prefix=_DOWNLOAD_PREFIX))
        try:
            tmp = tmpdir / filename
            h = hashlib.sha256()
            n = 0
            end = time.monotonic() + deadline
            try:
                # each wait is bounded by the time left, so a stalled or trickling server meets the deadline
                with urllib.request.urlopen(url, timeout=min(timeout, deadline)) as resp, open(tmp, "wb") as out:
                    while True:
                        chunk = resp.read1(_CHUNK)  # what has arrived, not a full chunk
                        if not chunk:
                            break
                        n += len(chunk)
                        if max_bytes is not None and n > max_bytes:
                            raise ModelError(f"download {url} is larger than {max_bytes} bytes; stopped")
                        if time.monotonic() > end:
                            raise ModelError(f"download {url} did not finish within {deadline:g} s ({n} bytes "
                                             "received); stopped, nothing was installed. Allow more time with "
                                             "--timeout or DEEPSEGRECON_DOWNLOAD_TIMEOUT")
                        h.update(chunk)
                        out.write(chunk)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceError(f"no space left to download {url} into {tmpdir.parent}") from e
                reason = getattr(e, "reason", None) or e
                # a wait bounded by the deadline itself timed out, or the deadline passed
                if time.monotonic() > end or (isinstance(reason, TimeoutError) and deadline <= timeout):
                    raise ModelError(f"download {url} did not finish within {deadline:g} s; stopped, nothing "
                                     "was installed. Allow more time with --timeout or "
                                     "DEEPSEGRECON_DOWNLOAD_TIMEOUT") from e
                raise ModelError(f"cannot download {url}: {getattr(e, 'reason', None) or e}") from e
            except ValueError as e:  # URLError, HTTPError, timeouts are OSErrors; a bad URL a ValueError
                raise ModelError(f"cannot download {url}: {e}") from e
            got = h.hexdigest()
            if got != sha256:
                raise ModelError(f"checksum mismatch for {url}: expected sha256 {sha256}, the download has {got}; "
                                 "nothing was installed")
            if _is_model_archive(tmp):  # a zipped / tarred version folder with its manifest
                return self.import_file(tmp, task=task, version=version, overwrite=overwrite, default=default,
                                        **fields)
            if not task:
                raise InputError(f"installing the single file {filename} needs the task it is for (--task)")
            _refuse_broken_archive(tmp)
            version = version or _dt.datetime.now().strftime("imported-%Y%m%d-%H%M%S")
            manifest = {k: v for k, v in fields.items() if v is not None}
            manifest["files"] = {filename: sha256}
            manifest.setdefault("description", f"downloaded from {url}")
            return self.write_version(task, version, {filename: tmp}, _imported(manifest, default),
                                      overwrite=overwrite, move=True)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def average(self, task: str, versions, name: str, weights=None, **fields) -> ModelEntry:
        """Install ``name``: the weighted average of the weights of ``versions`` (a "model soup",
        Wortsman et al. 2022). They must share the task, the weight files, the network config and every
        tensor's shape (e.g. a version and its fine-tunes). ``weights`` default to equal shares."""
        import torch

        versions = [str(v) for v in versions]
        if len(versions) < 2:
            raise InputError("averaging needs at least two model versions")
        weights = [1.0] * len(versions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(versions) or not all(0 < w < float("inf") for w in weights):
            raise InputError(f"give one positive weight per version ({len(versions)}), got {weights}")
        shares = [w / sum(weights) for w in weights]
        task = _check_name(task, "task")
        name = _check_name(name, "version")
        self._refuse_existing(task, name, self.root / task / name, False)
        entries = [self.get(task, v) for v in versions]
        first = entries[0]
        for e in entries[1:]:
            if set(e.files) != set(first.files) or e.manifest.get("network") != first.manifest.get("network"):
                raise ModelError(f"models {first.version} and {e.version} have different weight files or network "
                                 "configs; only versions of one network can be averaged")
        tmpdir = Path(tempfile.mkdtemp(prefix="deepsegrecon-average-"))
        try:
            files = {}
            for fname in sorted(first.files):
                states = [load_state_dict(e, fname, task) for e in entries]
                out = {}
                for key, ref in states[0].items():
                    parts = [s.get(key) for s in states]
                    if any(p is None or p.shape != ref.shape for p in parts):
                        raise ModelError(f"{fname}: tensor {key} is missing or has another shape in one of "
                                         f"{', '.join(versions)}; only versions of one network can be averaged")
                    if ref.is_floating_point():
                        out[key] = sum(s * p.double() for s, p in zip(shares, parts)).to(ref.dtype)
                    elif all(torch.equal(p, ref) for p in parts) or key.endswith("num_batches_tracked"):
                        out[key] = ref  # a batch-norm step counter: the first version's
                    else:
                        raise ModelError(f"{fname}: the integer tensor {key} differs between versions; "
                                         "it cannot be averaged")
                files[fname] = tmpdir / fname
                torch.save(out, files[fname])
            keep = ("labels", "input_spec", "network")
            manifest = {k: v for k, v in first.manifest.items() if k in keep}
            sources = list(dict.fromkeys(str(e.manifest.get("trained_on")) for e in entries
                                         if e.manifest.get("trained_on")))
            command = (f"deepsegrecon models average {task} {' '.join(versions)} --weights "
                       f"{' '.join(f'{w:g}' for w in weights)} --name {name}")
            manifest.update(name=f"{task} {name} (average of {', '.join(versions)})", base_version=first.version,
                            trained_on="; ".join(sources) or None, training={"kind": "average", "command": command},
                            averaged_from=[{"version": e.version, "weight": round(s, 6), "files": dict(e.files)}
                                           for e, s in zip(entries, shares)],
                            description=f"weight average of {task} versions "
                                        + ", ".join(f"{e.version} ({s:.2f})" for e, s in zip(entries, shares)))
            manifest.update({k: v for k, v in fields.items() if v is not None})
            return self.write_version(task, name, files, manifest, move=True)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def remove(self, task: str, version: str) -> None:
        """Remove a version from the user store; built-in versions cannot be removed."""
        task = _check_name(task, "task")
        version = _check_name(version, "version")
        target = self.root / task / version
        if not (target / MANIFEST).is_file():
            entry = self.get(task, version)  # raises, naming the versions that exist
            raise ModelError(f"model {task} {version} is built in (in {entry.dir.parent}) and cannot be removed"
                             if entry.builtin else f"model {task} {version} is not in the user store {self.root}")
        tdir = target.parent
        trash = Path(tempfile.mkdtemp(prefix=f".removing-{version}-", dir=tdir))
        try:
            os.replace(target, trash / "v")
        except OSError as e:
            shutil.rmtree(trash, ignore_errors=True)
            raise ModelError(f"cannot remove model {task} {version}: {e.strerror or e}") from e
        shutil.rmtree(trash, ignore_errors=True)
        _rmdir_if_empty(tdir)


_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _archive_names(path: Path):
    """The member names of a zip (or, by its suffix, tar) file; None when it is no readable archive."""
    import tarfile
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return z.namelist()
        if path.name.lower().endswith(_ARCHIVE_SUFFIXES) and tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                return t.getnames()
    except Exception:  # truncated or corrupt: BadZipFile, TarError, EOFError, zlib.error, ...
        return None
    return None


def _is_model_archive(path: Path) -> bool:
    """A .zip/.tar(.gz) holding a version folder (a manifest.json). A torch ``.pt`` file is a zip too,
    but holds no manifest, so it is not taken for an archive."""
    return any(Path(n).name == MANIFEST for n in _archive_names(path) or ())


def _refuse_broken_archive(path: Path) -> None:
    """Never install an archive that is not a readable model archive, nor a broken zip, as a weights file."""
    import zipfile

    if path.name.lower().endswith(_ARCHIVE_SUFFIXES):  # (a truncated zip may even show another zip inside it)
        raise ModelError(f"{path.name} is not a readable model archive: it is truncated or corrupt, or holds no "
                         f"{MANIFEST}; nothing was installed. An archive must hold one version folder with its "
                         f"{MANIFEST}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # PyTorch files are zips too
        raise ModelError(f"{path.name} is a truncated or corrupt zip file; nothing was installed")


def _imported(manifest: dict, default: bool) -> dict:
    """An imported version's manifest: ``default`` only when asked for, and when it was imported."""
    manifest.pop("default", None)
    if default:
        manifest["default"] = True
    manifest["imported"] = _dt.datetime.now(_dt.timezone.utc).isoformat()  # microseconds: orders imports
    return manifest


def download_deadline(value=None) -> float:
    """The overall download deadline in seconds: ``value``, else ``$DEEPSEGRECON_DOWNLOAD_TIMEOUT``, else 600."""
    source = "the download timeout"
    if value is None:
        value = os.environ.get("DEEPSEGRECON_DOWNLOAD_TIMEOUT")
        source = "DEEPSEGRECON_DOWNLOAD_TIMEOUT"
        if value is None or not str(value).strip():
            return DOWNLOAD_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise InputError(f"{source} must be a positive number of seconds, got {value!r}")
    return seconds


def _remove_stale_downloads() -> None:
    """Remove download folders of killed runs (untouched for half an hour) from the temp folder."""
    now = time.time()
    for d in Path(tempfile.gettempdir()).glob(_DOWNLOAD_PREFIX + "*"):
        try:
            newest = max([d.lstat().st_mtime] + [p.lstat().st_mtime for p in d.iterdir()])
            if d.is_dir() and not d.is_symlink() and now - newest > _STALE_DOWNLOAD_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _extract_version_folder(archive: Path, dest: Path) -> Path:
    """Unpack safely (no absolute paths, no '..', no links) and return the folder holding manifest.json."""
    import tarfile
    import zipfile

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    p = Path(name)
                    if p.is_absolute() or ".." in p.parts:
                        raise ModelError(f"{archive.name} holds an unsafe path '{name}'; refusing to unpack it")
                z.extractall(dest)
        else:
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
    except (ModelError, MemoryError):
        raise
    except tarfile.FilterError as e:  # a link or a path leading out of the folder
        raise ModelError(f"{archive.name} holds an unsafe member ({_short(e)}); refusing to unpack it") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"no space left to unpack {archive.name} into {dest}") from e
        raise ModelError(f"{archive.name} cannot be unpacked: {_short(e)}") from e
    except Exception as e:  # BadZipFile, TarError, EOFError, zlib.error, ...: truncated or corrupt
        raise ModelError(f"{archive.name} is not a readable archive (truncated or corrupt): {_short(e)}") from e
    manifests = sorted(dest.rglob(MANIFEST), key=lambda p: len(p.parts))
    if len(manifests) != 1:
        raise ModelError(f"{archive.name} must hold exactly one model version (one {MANIFEST}); it holds {len(manifests)}")
    return manifests[0].parent


def _short(error, limit: int = 160) -> str:
    """The first line of an error message, cut to ``limit`` characters (some quote binary data)."""
    line = next((x.strip() for x in str(error).splitlines() if x.strip()), type(error).__name__)
    return line if len(line) <= limit else line[:limit] + "..."


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def verify_file(entry: ModelEntry, filename: str, expected: str | None = None) -> Path:
    path = entry.path(filename)
    expected = (expected or entry.files.get(filename) or "").lower()
    if not path.is_file():
        raise ModelError(f"model {entry.task} {entry.version} is incomplete: {filename} is missing from {entry.dir}")
    st = path.stat()
    if entry.verified.get(filename) == (st.st_size, st.st_mtime_ns):
        return path
    got = sha256_file(path)
    if got != expected:
        raise ModelError(f"checksum mismatch for {filename} in model {entry.task} {entry.version} ({entry.dir}): "
                         f"the manifest says sha256 {expected or '(none)'}, the file has {got}; "
                         "the file is damaged or was replaced: re-import the model")
    entry.verified[filename] = (st.st_size, st.st_mtime_ns)
    return path


def check_task(entry: ModelEntry, task: str | None) -> None:
    """Refuse weights whose manifest names another task."""
    mtask = entry.manifest.get("task")
    if task is not None and mtask != task:
        raise ModelError(f"model {entry.version} in {entry.dir} holds weights for task '{mtask}', not '{task}'")


def load_state_dict(entry: ModelEntry, filename: str, task: str | None = None):
    """Verify the file's sha256 and task, then load it with ``torch.load(weights_only=True)`` on the CPU
    (a state a check of this entry already read is handed over, not read again)."""
    check_task(entry, task)
    path = verify_file(entry, filename)
    if filename in entry.loaded:
        return entry.loaded.pop(filename)
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # garbage read as a pickle warns about its "protocol"
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # any failure to unpickle: IndexError, struct.error, UnicodeDecodeError, ...
        text = str(e)
        if "Unsupported global" in text:
            raise ModelError(f"{filename} in model {entry.task} {entry.version} ({path}) holds Python objects other "
                             "than tensors; refusing to load it (only plain weights are loaded, for safety)") from e
        if "WeightsUnpickler error:" in text:  # torch's long advice is about trusted pickles, not this
            text = text.split("WeightsUnpickler error:", 1)[1]
        raise ModelError(f"{filename} in model {entry.task} {entry.version} is corrupt: not a PyTorch weights file "
                         f"({type(e).__name__}: {_short(text)}); file {path}") from e
    if not isinstance(state, dict):
        raise ModelError(f"{filename} in model {entry.task} {entry.version} is not a state dict "
                         f"(it holds a {type(state).__name__})")
    return state
