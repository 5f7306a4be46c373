"""The model store: manifests, checksums, imports (file, folder, URL), removal and safe loading."""

import functools
import hashlib
import http.server
import json
import pathlib
import threading

import pytest

from deepsegrecon.errors import InputError, ModelError
from deepsegrecon.store import MANIFEST, ModelStore, load_state_dict, sha256_file


class _Evil:
    """Unpickling this runs code (touches a marker file): weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _tree(root: pathlib.Path) -> dict:
    """Every path under root with its content hash (to show a store is unchanged)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def store(tmp_path):
    return ModelStore(root=tmp_path / "user", builtin_root=tmp_path / "builtin")


@pytest.fixture
def weights(tmp_path):
    import torch

    path = tmp_path / "src" / "net.pt"
    path.parent.mkdir()
    torch.save({"conv.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "conv.bias": torch.ones(2)}, path)
    return path


def _builtin_version(root, task, version, files: dict, **manifest):
    d = root / task / version
    d.mkdir(parents=True)
    sums = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (d / MANIFEST).write_text(json.dumps({"task": task, "version": version, "files": sums, **manifest}))
    return d


def test_manifest_round_trip_and_versions(store, weights):
    labels = {"tooth_11": 11, "maxilla": 1}
    e = store.write_version("teeth", "1.0", {"net.pt": weights},
                            {"labels": labels, "network": {"arch": "unet", "channels": [8, 16]},
                             "input_spec": {"spacing": [0.4, 0.4, 0.4]}, "trained_on": "phantoms",
                             "metrics": {"dice": 0.91}, "description": "first"})
    assert e.dir == store.root / "teeth" / "1.0" and not e.builtin
    back = store.get("teeth", "1.0")
    assert back.manifest == e.manifest
    assert back.manifest["labels"] == labels and back.manifest["network"]["channels"] == [8, 16]
    assert back.manifest["files"] == {"net.pt": sha256_file(weights)}
    assert set(back.manifest) >= {"name", "task", "version", "files", "labels", "input_spec", "network",
                                  "created", "trained_on", "base_version", "metrics", "description"}
    assert sorted(p.name for p in e.dir.iterdir()) == [MANIFEST, "net.pt"]
    store.verify(back)

    store.write_version("teeth", "1.10", {"net.pt": weights}, {"created": "2030-01-01T00:00:00+00:00"})
    store.write_version("teeth", "1.9", {"net.pt": weights}, {"created": "2030-01-01T00:00:00+00:00"})
    assert [x.version for x in store.list("teeth")] == ["1.0", "1.9", "1.10"]
    assert store.get("teeth").version == "1.10"  # newest
    _builtin_version(store.builtin_root, "teeth", "shipped", {"w.pt": b"x"}, default=True)
    assert store.get("teeth").version == "shipped" and store.get("teeth").builtin  # manifest-declared default
    with pytest.raises(ModelError, match=r"no model version '2\.0'.*1\.0, 1\.9, 1\.10, shipped"):
        store.get("teeth", "2.0")
    with pytest.raises(ModelError, match="no model for task 'brain'.*teeth"):
        store.get("brain")
    with pytest.raises(ModelError, match="already installed"):
        store.write_version("teeth", "1.0", {"net.pt": weights}, {})
    with pytest.raises(ModelError, match="built in"):
        store.write_version("teeth", "shipped", {"net.pt": weights}, {})
    with pytest.raises(InputError, match="not a valid name"):
        store.write_version("teeth", "../escape", {"net.pt": weights}, {})
    assert not list((store.root / "teeth").glob(".*"))  # no staging folder left


def test_write_version_is_atomic(store, weights, tmp_path):
    store.write_version("teeth", "1", {"net.pt": weights}, {})
    before = _tree(store.root)
    other = tmp_path / "other.pt"
    other.write_bytes(b"second file")
    # the second file fails its checksum after the first was copied: nothing of "2" may remain
    with pytest.raises(ModelError, match="checksum mismatch for other.pt"):
        store.write_version("teeth", "2", {"net.pt": weights, "other.pt": other},
                            {"files": {"net.pt": sha256_file(weights), "other.pt": "0" * 64}})
    assert _tree(store.root) == before
    # overwrite swaps the whole folder, other versions untouched
    store.write_version("teeth", "1", {"other.pt": other}, {"description": "replaced"}, overwrite=True)
    assert store.get("teeth", "1").files == {"other.pt": sha256_file(other)}
    assert sorted(p.name for p in (store.root / "teeth").iterdir()) == ["1"]


def test_verify_names_the_damaged_file(store, weights):
    e = store.write_version("teeth", "1", {"net.pt": weights}, {})
    with open(e.dir / "net.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"checksum mismatch for net\.pt in model teeth 1"):
        store.verify(store.get("teeth", "1"))
    (e.dir / "net.pt").unlink()
    with pytest.raises(ModelError, match=r"net\.pt is missing"):
        store.verify(store.get("teeth", "1"))


def test_import_file_and_folder(store, weights, tmp_path):
    with pytest.raises(InputError, match="needs the task"):
        store.import_file(weights)
    before = _tree(store.root)
    with pytest.raises(ModelError, match="checksum mismatch"):
        store.import_file(weights, task="teeth", version="a", sha256="f" * 64)
    assert _tree(store.root) == before
    e = store.import_file(weights, task="teeth", version="a", sha256=sha256_file(weights), description="mine")
    assert e.manifest["description"] == "mine" and e.files == {"net.pt": sha256_file(weights)}

    # a whole version folder (as exported by another installation)
    exported = tmp_path / "exported"
    _builtin_version(exported, "teeth", "b", {"w.pt": weights.read_bytes()}, labels={"tooth_11": 11})
    e = store.import_file(exported / "teeth" / "b")
    assert (e.task, e.version, e.manifest["labels"]) == ("teeth", "b", {"tooth_11": 11})
    with pytest.raises(ModelError, match="for task 'teeth', not 'brain'"):
        store.import_file(exported / "teeth" / "b", task="brain", version="c")
    (exported / "teeth" / "b" / "w.pt").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="checksum mismatch for w.pt"):
        store.import_file(exported / "teeth" / "b", version="d")
    assert [x.version for x in store.list("teeth")] == ["a", "b"]


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a temp folder, stopped at the end."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_import_url(store, weights, http_root):
    root, base = http_root
    (root / "teeth weights.pt").write_bytes(weights.read_bytes())
    good = sha256_file(weights)
    url = f"{base}/teeth%20weights.pt"

    with pytest.raises(ModelError, match="checksum mismatch.*nothing was installed"):
        store.import_url(url, "0" * 64, "teeth", "web")
    assert _tree(store.root) == {}
    with pytest.raises(ModelError, match="cannot download"):
        store.import_url(f"{base}/missing.pt", good, "teeth", "web")
    with pytest.raises(InputError, match="sha256"):
        store.import_url(url, "", "teeth", "web")
    assert _tree(store.root) == {}

    e = store.import_url(url, good.upper(), "teeth", "web", labels={"tooth_11": 11})
    assert e.files == {"teeth weights.pt": good} and e.manifest["labels"] == {"tooth_11": 11}
    assert url in e.manifest["description"]
    state = load_state_dict(store.get("teeth", "web"), "teeth weights.pt", task="teeth")
    assert state["conv.weight"].shape == (2, 3)

    # a zipped version folder (manifest inside) installs as that version
    import zipfile

    folder = _builtin_version(root / "src", "teeth", "v2", {"net.pt": weights.read_bytes()}, labels={"a": 1})
    with zipfile.ZipFile(root / "teeth-v2.zip", "w") as z:
        for f in folder.iterdir():
            z.write(f, f"teeth-v2/{f.name}")
    e = store.import_url(f"{base}/teeth-v2.zip", sha256_file(root / "teeth-v2.zip"))
    assert (e.task, e.version, e.manifest["labels"]) == ("teeth", "v2", {"a": 1})
    assert [x.version for x in store.list("teeth")] == ["v2", "web"]
    assert load_state_dict(e, "net.pt", task="teeth")["conv.bias"].shape == (2,)


def test_load_state_dict_refuses_bad_weights(store, weights, tmp_path):
    import torch

    e = store.write_version("teeth", "ok", {"net.pt": weights}, {})
    state = load_state_dict(e, "net.pt", task="teeth")
    assert torch.equal(state["conv.bias"], torch.ones(2))

    # another task's weights
    with pytest.raises(ModelError, match="for task 'teeth', not 'brain'"):
        load_state_dict(e, "net.pt", task="brain")
    with pytest.raises(ModelError, match="has no file 'other.pt'"):
        load_state_dict(e, "other.pt")

    # corrupt at the source (its checksum matches, its content is not weights)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(weights.read_bytes()[:200])
    e = store.write_version("teeth", "corrupt", {"net.pt": junk}, {})
    with pytest.raises(ModelError, match="corrupt"):
        load_state_dict(e, "net.pt", task="teeth")

    # damaged after installation: the checksum is checked before loading
    e = store.write_version("teeth", "damaged", {"net.pt": weights}, {})
    data = bytearray((e.dir / "net.pt").read_bytes())
    data[-100] ^= 0xFF
    (e.dir / "net.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch for net.pt"):
        load_state_dict(e, "net.pt", task="teeth")

    # a pickle that would run code: refused, and the code did not run
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Evil(marker)}, evil)
    e = store.write_version("teeth", "evil", {"net.pt": evil}, {})
    with pytest.raises(ModelError, match="refusing to load"):
        load_state_dict(e, "net.pt", task="teeth")
    assert not marker.exists()


def test_remove(store, weights):
    _builtin_version(store.builtin_root, "teeth", "shipped", {"w.pt": b"x"})
    store.write_version("teeth", "mine", {"net.pt": weights}, {})
    builtin_before = _tree(store.builtin_root)
    with pytest.raises(ModelError, match="built in.*cannot be removed"):
        store.remove("teeth", "shipped")
    with pytest.raises(ModelError, match="no model version 'nope'.*mine, shipped"):
        store.remove("teeth", "nope")
    store.remove("teeth", "mine")
    assert [e.version for e in store.list("teeth")] == ["shipped"]
    assert not (store.root / "teeth").exists()
    assert _tree(store.builtin_root) == builtin_before


def test_default_roots_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "shipped"))
    s = ModelStore()
    assert s.root == tmp_path / "home" / "models" and s.builtin_root == tmp_path / "shipped"
    monkeypatch.delenv("DEEPSEGRECON_BUILTIN_MODELS")
    assert ModelStore().builtin_root.parts[-2:] == ("Resources", "Models")


def _version_with(store, tmp_path, version, state, network=None):
    import torch

    path = tmp_path / f"{version}.pt"
    torch.save(state, path)
    return store.write_version("seg", version, {"net.pt": path}, {"network": network or {"arch": "toy"}})


def test_average_versions(store, tmp_path):
    import torch

    a = {"w": torch.tensor([0.0, 4.0]), "steps": torch.tensor(3), "bn.num_batches_tracked": torch.tensor(7)}
    b = {"w": torch.tensor([2.0, 8.0]), "steps": torch.tensor(3), "bn.num_batches_tracked": torch.tensor(9)}
    _version_with(store, tmp_path, "a", a)
    _version_with(store, tmp_path, "b", b)
    entry = store.average("seg", ["a", "b"], "soup", weights=[3, 1])
    state = load_state_dict(entry, "net.pt", task="seg")
    assert torch.allclose(state["w"], torch.tensor([0.5, 5.0])) and int(state["steps"]) == 3
    assert int(state["bn.num_batches_tracked"]) == 7  # a step counter: the first version's
    store.verify(entry)
    m = entry.manifest
    assert m["base_version"] == "a" and [p["weight"] for p in m["averaged_from"]] == [0.75, 0.25]
    assert m["averaged_from"][1]["files"] == store.get("seg", "b").files and m["network"] == {"arch": "toy"}
    assert "metrics" not in m or m["metrics"] is None
    assert not m.get("default")
    assert m["training"]["command"] == "deepsegrecon models average seg a b --weights 3 1 --name soup"


def test_average_refuses_other_networks_and_writes_nothing(store, tmp_path):
    import torch

    _version_with(store, tmp_path, "a", {"w": torch.zeros(2)})
    _version_with(store, tmp_path, "wide", {"w": torch.zeros(3)})
    _version_with(store, tmp_path, "other", {"w": torch.zeros(2)}, network={"arch": "other"})
    _version_with(store, tmp_path, "ints", {"w": torch.zeros(2, dtype=torch.long) + 1})
    _version_with(store, tmp_path, "ints2", {"w": torch.zeros(2, dtype=torch.long)})
    before = _tree(store.root)
    with pytest.raises(ModelError, match="another shape"):
        store.average("seg", ["a", "wide"], "soup")
    with pytest.raises(ModelError, match="network configs"):
        store.average("seg", ["a", "other"], "soup")
    with pytest.raises(InputError, match="at least two"):
        store.average("seg", ["a"], "soup")
    with pytest.raises(InputError, match="one positive weight"):
        store.average("seg", ["a", "wide"], "soup", weights=[1, 0])
    with pytest.raises(InputError, match="one positive weight"):
        store.average("seg", ["a", "wide"], "soup", weights=[1, float("inf")])
    with pytest.raises(ModelError, match="no model version 'nope'"):
        store.average("seg", ["a", "nope"], "soup")
    with pytest.raises(ModelError, match="already installed"):
        store.average("seg", ["a", "wide"], "a")
    with pytest.raises(ModelError, match="integer tensor w differs"):
        store.average("seg", ["ints", "ints2"], "soup")
    assert _tree(store.root) == before


def test_a_run_hashes_and_loads_each_weights_file_once(monkeypatch):
    """The runner checks the weights (sha256 once per file) and hands the checked entry to the task, which loads
    each file once without hashing it again."""
    import numpy as np
    import torch

    import deepsegrecon.store as S
    from deepsegrecon import run
    from deepsegrecon.image import Image

    hashed, loaded = [], []
    sha, load = S.sha256_file, torch.load
    monkeypatch.setattr(S, "sha256_file", lambda p: hashed.append(pathlib.Path(p).name) or sha(p))
    monkeypatch.setattr(torch, "load", lambda p, *a, **k: loaded.append(pathlib.Path(p).name) or load(p, *a, **k))
    k, j, i = np.mgrid[:8, :48, :48]
    body = np.where((j - 24) ** 2 + (i - 24) ** 2 < 400, 40.0, -1000.0).astype(np.float32)
    run("slices", {"image": Image(body, spacing=(2.0, 1.5, 1.5))}, {"device": "cpu"})
    entry = S.ModelStore().get("slices")
    assert sorted(hashed) == sorted(entry.files)
    assert sorted(loaded) == sorted(f for f in entry.files if f.endswith(".pt"))
