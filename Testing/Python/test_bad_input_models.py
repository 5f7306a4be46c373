"""Bad input through `deepsegrecon models ...` and `add-case`: the right exit code, a message naming the problem,
nothing written, the model stores unchanged and no temporary file left. Also: an import never changes which
version unpinned runs use unless asked (`--default`), and downloads have an overall deadline."""

import errno
import hashlib
import http.server
import io
import json
import os
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deepsegrecon import cli
from deepsegrecon import store as store_mod
from deepsegrecon.image import Image
from deepsegrecon.io import write_image
from deepsegrecon.store import ModelStore

# bytes whose checksum is fine but that torch cannot load: each makes the unpickler fail in another way
JUNK = {
    "IndexError": b"\x80\xe2\x86\x19A\x8e\xce\xb2'\x8b\xb7OY\x8b;[\x9f\xc8",
    "struct.error": b"K}K.J}}",
    "KeyError": b"\x80\x02]q\x00(K\x01h\x05e.",
    "UnicodeDecodeError": b"\x80\x02X\x02\x00\x00\x00\xff\xfeq\x00.",
    "EOFError": b"",
    "text": b"these are not weights\n",
}


def _torch_bytes(value=0.0) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.full((2, 3), float(value))}, buf)
    return buf.getvalue()


def _tree(root: Path) -> dict:
    """Every path under root with its content hash: equal before and after means unchanged."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _version(root: Path, task, version, files: dict, **manifest) -> Path:
    d = root / task / version
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    sums = {n: hashlib.sha256(data).hexdigest() for n, data in files.items()}
    (d / "manifest.json").write_text(json.dumps({"task": task, "version": version, "files": sums, **manifest}))
    return d


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Temporary user and built-in stores (a good built-in teeth default) and a private temp folder."""
    tmp = tmp_path / "system tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    monkeypatch.delenv("DEEPSEGRECON_DOWNLOAD_TIMEOUT", raising=False)
    _version(tmp_path / "builtin", "teeth", "shipped", {"net.pt": _torch_bytes()}, default=True,
             created="2026-01-01T00:00:00+00:00")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return {"tmp": tmp, "user": tmp_path / "home" / "models", "builtin": tmp_path / "builtin", "inputs": inputs,
            "root": tmp_path}


def _stores(env):
    return _tree(env["user"]), _tree(env["builtin"])


def _run(capsys, env, *argv):
    """Run the CLI in this process; a failure must leave both stores and the temp folder as they were."""
    before = _stores(env)
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if code != 0:
        assert _stores(env) == before, "a failed command changed a model store"
        assert err.count("error: ") == 1 and err.rstrip().splitlines()[-1].startswith("error: "), err
        assert "Traceback" not in err
    assert list(env["tmp"].iterdir()) == [], "temporary files were left behind"
    return code, out, err


# ------------------------------------------------------------------------------ weights that cannot be loaded
@pytest.mark.parametrize("kind", sorted(JUNK))
def test_verify_deep_reports_weights_that_cannot_be_loaded(capsys, env, kind):
    _version(env["builtin"], "teeth", "junk", {"net.pt": JUNK[kind]})
    code, out, _ = _run(capsys, env, "models", "verify", "teeth")
    assert code == 0 and "ok      teeth junk (built-in)" in out  # the checksums are right
    code, out, err = _run(capsys, env, "models", "verify", "teeth", "--deep")
    assert code == 3 and "1 of 2 model versions failed verification" in err
    assert "FAILED  teeth junk (built-in): net.pt in model teeth junk is corrupt: not a PyTorch weights file" in out
    assert str(env["builtin"] / "teeth" / "junk" / "net.pt") in out  # names the file
    assert "ok      teeth shipped (built-in)" in out


def test_verify_deep_named_version(capsys, env):
    _version(env["user"], "teeth", "v2", {"a.pt": _torch_bytes(), "b.pt": JUNK["IndexError"]})
    code, out, err = _run(capsys, env, "models", "verify", "teeth", "v2", "--deep")
    assert code == 3 and "b.pt in model teeth v2 is corrupt" in out and "1 of 1 model versions failed" in err
    code, out, _ = _run(capsys, env, "models", "verify", "teeth", "shipped", "--deep")
    assert code == 0 and out.strip() == "ok      teeth shipped (built-in)"


def test_average_with_unloadable_weights(capsys, env):
    _version(env["user"], "teeth", "a", {"net.pt": _torch_bytes(1)})
    _version(env["user"], "teeth", "bad", {"net.pt": JUNK["IndexError"]})
    code, _, err = _run(capsys, env, "models", "average", "teeth", "a", "bad", "--name", "soup")
    assert code == 3 and "net.pt in model teeth bad is corrupt: not a PyTorch weights file" in err
    assert not (env["user"] / "teeth" / "soup").exists()


def test_run_with_unloadable_weights_is_a_model_error(capsys, env):
    from deepsegrecon.errors import ModelError
    from deepsegrecon.store import load_state_dict

    d = _version(env["user"], "teeth", "bad", {"net.pt": JUNK["IndexError"]})
    before = _stores(env)
    with pytest.raises(ModelError, match=rf"net.pt in model teeth bad is corrupt.*{d / 'net.pt'}"):
        load_state_dict(ModelStore().get("teeth", "bad"), "net.pt", task="teeth")
    assert _stores(env) == before


# ------------------------------------------------------------------------------ archives that are not archives
def _good_zip(env) -> bytes:
    folder = _version(env["root"] / "export", "teeth", "z1", {"net.pt": _torch_bytes(2)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"z1/{f.name}")
    return buf.getvalue()


def test_truncated_zip_is_not_installed_as_weights(capsys, env):
    path = env["inputs"] / "teeth-z1.zip"
    path.write_bytes(_good_zip(env)[:-40])
    code, _, err = _run(capsys, env, "models", "import", path, "--task", "teeth", "--version", "z")
    assert code == 3 and "teeth-z1.zip is not a readable model archive: it is truncated or corrupt" in err
    assert "nothing was installed" in err
    code, _, err = _run(capsys, env, "models", "import", path)  # no --task: refused too
    assert code == 2 and "needs the task" in err


def test_zip_without_manifest_is_refused(capsys, env):
    path = env["inputs"] / "weights.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("net.pt", _torch_bytes())
    code, _, err = _run(capsys, env, "models", "import", path, "--task", "teeth", "--version", "z")
    assert code == 3 and "weights.zip is not a readable model archive" in err


def test_truncated_tar_gz_is_refused(capsys, env):
    folder = _version(env["root"] / "export", "teeth", "t1", {"net.pt": _torch_bytes(3)})
    path = env["inputs"] / "t1.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        t.add(folder, "t1")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = _run(capsys, env, "models", "import", path, "--task", "teeth", "--version", "t")
    assert code == 3 and "t1.tar.gz is not a readable model archive" in err


def test_truncated_torch_file_is_refused(capsys, env):
    path = env["inputs"] / "net.pt"
    path.write_bytes(_torch_bytes()[:300])
    code, _, err = _run(capsys, env, "models", "import", path, "--task", "teeth", "--version", "t")
    assert code == 3 and "net.pt is a truncated or corrupt zip file; nothing was installed" in err


def test_corrupt_member_of_a_model_archive_is_refused(capsys, env):
    data = bytearray(_good_zip(env))
    i = data.index(b"PK\x03\x04", 4)  # second member's header: damage its data, keep the directory
    data[i - 20:i - 10] = b"\xff" * 10
    path = env["inputs"] / "damaged.zip"
    path.write_bytes(bytes(data))
    code, _, err = _run(capsys, env, "models", "import", path, "--task", "teeth", "--version", "d")
    assert code == 3 and "damaged.zip is not a readable archive (truncated or corrupt)" in err and len(err) < 400


# ------------------------------------------------------------------------------ an import is never the default
def test_imported_copy_of_the_default_does_not_become_the_default(capsys, env):
    copy = env["root"] / "copy"
    _version(copy, "teeth", "mine", {"net.pt": _torch_bytes(5)}, default=True, created="2030-01-01T00:00:00+00:00")
    code, out, err = _run(capsys, env, "models", "import", copy / "teeth" / "mine")
    assert code == 0, err
    assert "default version of teeth: shipped (to make it this one, import it with --default)" in out
    entry = ModelStore().get("teeth")
    assert entry.version == "shipped" and not ModelStore().get("teeth", "mine").manifest.get("default")
    code, out, _ = _run(capsys, env, "models", "list")
    assert next(line for line in out.splitlines() if " shipped " in line).split()[2] == "*"

    code, out, err = _run(capsys, env, "models", "import", copy / "teeth" / "mine", "--version", "mine2", "--default")
    assert code == 0, err
    assert "default version of teeth: mine2\n" in out and ModelStore().get("teeth").version == "mine2"


def test_import_does_not_change_the_newest_fallback(capsys, env):
    """No version is marked default: the newest trained/shipped one is used, never a later import."""
    import shutil

    shutil.rmtree(env["builtin"] / "teeth" / "shipped")
    _version(env["builtin"], "teeth", "old", {"net.pt": _torch_bytes()}, created="2026-01-01T00:00:00+00:00")
    _version(env["builtin"], "teeth", "new", {"net.pt": _torch_bytes(1)}, created="2026-06-01T00:00:00+00:00")
    weights = env["inputs"] / "w.pt"
    weights.write_bytes(_torch_bytes(7))
    for version in ("x1", "a0"):  # created now, i.e. newer than both
        code, out, err = _run(capsys, env, "models", "import", weights, "--task", "teeth", "--version", version)
        assert code == 0, err
        assert "default version of teeth: new (to make it this one" in out
        assert ModelStore().get("teeth").version == "new"
    # a task with imported versions only: the first imported stays the choice
    for version in ("z9", "a1"):
        code, _, err = _run(capsys, env, "models", "import", weights, "--task", "liver", "--version", version)
        assert code == 0, err
        assert ModelStore().get("liver").version == "z9"


def test_imported_copy_does_not_take_over_cbct_views(capsys, env):
    """cbct-recon picks a version trained for the number of views; an imported copy does not take over."""
    from deepsegrecon.cbct.task import model_for

    spec = {"views": [10], "arc_deg": 360}
    _version(env["builtin"], "cbct-recon", "v2", {"m.pt": b"a"}, default=True)
    _version(env["builtin"], "cbct-recon", "v3-10", {"m.pt": b"b"}, input_spec=spec)
    _version(env["root"] / "copy", "cbct-recon", "mine-10", {"m.pt": b"c"}, input_spec=spec)
    code, _, err = _run(capsys, env, "models", "import", env["root"] / "copy" / "cbct-recon" / "mine-10")
    assert code == 0, err
    angles = np.arange(10) * 36.0
    assert model_for(ModelStore(), None, angles).version == "v3-10"
    code, _, err = _run(capsys, env, "models", "import", env["root"] / "copy" / "cbct-recon" / "mine-10",
                        "--version", "mine-10b", "--default")
    assert code == 0, err
    assert model_for(ModelStore(), None, angles).version == "mine-10b"


# ------------------------------------------------------------------------------ downloads: deadline and cleanup
@pytest.fixture
def slow_server():
    """A loopback server: /trickle sends one byte every 0.2 s, /stall sends headers and then nothing."""
    stop = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                while not stop.is_set():
                    if self.path.startswith("/trickle"):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    stop.wait(0.2)
            except OSError:
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


SHA = "ab" * 32


@pytest.mark.parametrize("path", ["trickle", "stall"])
def test_download_meets_its_deadline(capsys, env, slow_server, path):
    t0 = time.monotonic()
    code, _, err = _run(capsys, env, "models", "import", "--url", f"{slow_server}/{path}/net.pt", "--sha256", SHA,
                        "--task", "teeth", "--version", "web", "--timeout", "1")
    assert code == 3 and "did not finish within 1 s" in err and "nothing was installed" in err
    assert time.monotonic() - t0 < 4


def test_download_deadline_from_the_environment(capsys, env, slow_server, monkeypatch):
    monkeypatch.setenv("DEEPSEGRECON_DOWNLOAD_TIMEOUT", "0.8")
    t0 = time.monotonic()
    code, _, err = _run(capsys, env, "models", "import", "--url", f"{slow_server}/trickle/net.pt", "--sha256", SHA,
                        "--task", "teeth")
    assert code == 3 and "did not finish within 0.8 s" in err and time.monotonic() - t0 < 4


@pytest.mark.parametrize("where, value, message", [
    ("env", "soon", "DEEPSEGRECON_DOWNLOAD_TIMEOUT must be a positive number of seconds, got 'soon'"),
    ("env", "-5", "DEEPSEGRECON_DOWNLOAD_TIMEOUT must be a positive number of seconds"),
    ("option", "0", "the download timeout must be a positive number of seconds, got 0.0"),
    ("option", "nan", "the download timeout must be a positive number of seconds"),
])
def test_bad_download_timeout(capsys, env, monkeypatch, where, value, message):
    argv = ["models", "import", "--url", "http://127.0.0.1:9/net.pt", "--sha256", SHA, "--task", "teeth"]
    if where == "env":
        monkeypatch.setenv("DEEPSEGRECON_DOWNLOAD_TIMEOUT", value)
    else:
        argv += ["--timeout", value]
    code, _, err = _run(capsys, env, *argv)
    assert code == 2 and message in err


def test_timeout_without_a_download(capsys, env):
    weights = env["inputs"] / "w.pt"
    weights.write_bytes(_torch_bytes())
    code, _, err = _run(capsys, env, "models", "import", weights, "--task", "teeth", "--timeout", "5")
    assert code == 2 and "--timeout applies to downloads (--url) only" in err


class _FakeResponse:
    """What urlopen returns, failing after the first bytes with ``error``."""

    def __init__(self, error):
        self.error, self.sent = error, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read1(self, n):
        if not self.sent:
            self.sent = True
            return b"x" * 10
        raise self.error


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 4, "cancelled"),
    (OSError(errno.ENOSPC, "No space left on device"), 5, "no space left to download"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), 3, "cannot download"),
])
def test_failed_download_leaves_nothing(capsys, env, monkeypatch, error, code, message):
    monkeypatch.setattr(store_mod.urllib.request, "urlopen", lambda *a, **k: _FakeResponse(error))
    got, _, err = _run(capsys, env, "models", "import", "--url", "http://127.0.0.1:9/net.pt", "--sha256", SHA,
                       "--task", "teeth", "--version", "web")
    assert got == code and message in err


def test_stale_download_folders_are_removed(capsys, env, monkeypatch):
    stale = env["tmp"] / "deepsegrecon-download-killed"
    fresh = env["tmp"] / "deepsegrecon-download-running"
    for d in (stale, fresh):
        d.mkdir()
        (d / "net.pt").write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale / "net.pt", (old, old))
    os.utime(stale, (old, old))
    monkeypatch.setattr(store_mod.urllib.request, "urlopen",
                        lambda *a, **k: _FakeResponse(ConnectionResetError(errno.ECONNRESET, "reset")))
    before = _stores(env)
    code = cli.main(["models", "import", "--url", "http://127.0.0.1:9/net.pt", "--sha256", SHA, "--task", "teeth"])
    _, err = capsys.readouterr()
    assert code == 3 and "cannot download" in err and _stores(env) == before
    assert sorted(p.name for p in env["tmp"].iterdir()) == [fresh.name]  # a live download's folder is kept


# ------------------------------------------------------------------------------ add-case: the task's labels
def _case_inputs(env):
    rng = np.random.default_rng(3)
    image = write_image(Image(rng.normal(size=(8, 9, 10)).astype(np.float32)), env["inputs"] / "image.nrrd")
    lab = np.zeros((8, 9, 10), np.uint8)
    lab[2:5, 3:6, 4:7] = 1
    label = write_image(Image(lab), env["inputs"] / "label.nrrd")
    return image, label


@pytest.mark.parametrize("task, message", [
    ("teth", "task 'teth' has no labels of its own to check the case against (tasks with labels: "),
    ("../x", "task '../x' is not a valid name"),
])
def test_add_case_unknown_task_is_refused(capsys, env, task, message):
    image, label = _case_inputs(env)
    out = env["root"] / "cases" / "c1"
    code, _, err = _run(capsys, env, "add-case", task, "--image", f"image={image}", "--label", label, "-o", out)
    assert code == 2 and message in err and not out.parent.exists()
    if task == "teth":
        assert "teeth" in err and "--label-map" in err


def test_add_case_new_structure_with_a_label_map(capsys, env):
    image, label = _case_inputs(env)
    lmap = env["inputs"] / "labels.json"
    lmap.write_text(json.dumps({"liver": 2}))
    out = env["root"] / "cases" / "c1"
    argv = ["add-case", "liver", "--image", f"image={image}", "--label", label, "-o", out, "--label-map", lmap]
    code, _, err = _run(capsys, env, *argv)
    assert code == 2 and "label values [1]" in err and "not in the label map" in err and not out.parent.exists()
    lmap.write_text(json.dumps({"liver": 1}))
    code, out_text, err = _run(capsys, env, *argv)
    assert code == 0, err
    assert "wrote case c1" in out_text and (out / "case.json").is_file()
