"""Model packages published apart from the extension: `models install` against a real HTTP server on 127.0.0.1.

A download must be the package the trusted catalog names (sha256, size), its terms accepted where they are not
permissive, and nothing may be left half-installed when any check fails."""

import hashlib
import http.server
import json
import shutil
import threading
import zipfile

import pytest

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.models import locations
from AbdomenSegLib.models import store as model_store
from AbdomenSegLib.models.packages import catalog, find_model, load_network

RESEARCH = {"licence": "research use only (test)", "permissive": False, "text": "Use for research only."}


class Served:
    """Files served by a real http.server on 127.0.0.1: path -> bytes; `short` paths announce their full length
    and stop half-way (a dropped connection)."""

    def __init__(self):
        self.files, self.short = {}, set()
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = served.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in served.short else body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tiny_package, tmp_path, monkeypatch):
    """A trusted catalog listing tiny-test for download, the zip served over HTTP, an empty user model folder."""
    served = Served()
    zip_path, block = model_store.pack(tiny_package.path, tmp_path / "dist")
    served.files["/tiny-test.zip"] = zip_path.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    entry = {"name": "tiny-test", "path": "tiny-test", "download": dict(block, url=served.url("/tiny-test.zip"))}
    entry["terms"] = RESEARCH
    (index / "catalog.json").write_text(json.dumps({"default": "tiny-test", "models": [entry]}))
    home = tmp_path / "user models"
    monkeypatch.setenv("ABDOMENSEG_MODELS", str(home))
    yield type("Store", (), {"served": served, "index": index, "home": home, "zip": zip_path, "entry": entry})
    served.close()


def _left_in(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_install_by_name_over_http_gives_a_working_registered_package(store, tiny_package):
    seen = []
    final = model_store.install(
        "tiny-test",
        accept_terms=True,
        index_dir=store.index,
        progress=lambda done, total: seen.append((done, total)),
        log=lambda m: None,
    )
    assert final == store.home / "tiny-test" and _left_in(store.home) == ["catalog.json", "tiny-test"]
    assert seen[-1] == (store.zip.stat().st_size, store.zip.stat().st_size)
    card = find_model("tiny-test", store.home)  # registered in the user folder's catalog
    assert card["sha256"] == tiny_package["sha256"]
    assert load_network(card).state_dict().keys() == load_network(tiny_package).state_dict().keys()


def test_non_permissive_terms_must_be_accepted(store):
    with pytest.raises(AbdomenSegError, match="terms that need your acceptance: research use only") as raised:
        model_store.install("tiny-test", index_dir=store.index, log=lambda m: None)
    assert "--accept-terms" in str(raised.value)
    assert _left_in(store.home) == []  # downloaded, checked, refused: nothing stays
    assert model_store.needs_acceptance(store.entry)
    assert "Use for research only." in model_store.describe(store.entry)


def test_a_truncated_download_is_refused_and_nothing_is_installed(store):
    store.served.short.add("/tiny-test.zip")
    with pytest.raises(AbdomenSegError, match="broke off|incomplete or altered"):
        model_store.install("tiny-test", accept_terms=True, index_dir=store.index, log=lambda m: None)
    assert _left_in(store.home) == []


def test_a_corrupted_download_is_refused_and_nothing_is_installed(store):
    body = bytearray(store.served.files["/tiny-test.zip"])
    body[len(body) // 2] ^= 0xFF  # same size, one byte flipped inside the weights
    store.served.files["/tiny-test.zip"] = bytes(body)
    with pytest.raises(AbdomenSegError, match="not the .* the catalog names for 'tiny-test'"):
        model_store.install("tiny-test", accept_terms=True, index_dir=store.index, log=lambda m: None)
    assert _left_in(store.home) == []


def test_a_zip_whose_sha_the_catalog_does_not_name_is_refused(store, tmp_path):
    other = tmp_path / "other.zip"
    shutil.copy(store.zip, other)
    with zipfile.ZipFile(other, "a") as archive:
        archive.writestr("tiny-test/NOTES.md", "changed")
    store.served.files["/other.zip"] = other.read_bytes()
    for source in (store.served.url("/other.zip"), str(other)):
        with pytest.raises(AbdomenSegError, match="which is no package the catalog names"):
            model_store.install(source, accept_terms=True, index_dir=store.index, log=lambda m: None)
    assert _left_in(store.home) == []


def test_a_downloaded_zip_file_installs_and_an_installed_package_is_never_replaced_unasked(store):
    model_store.install(str(store.zip), accept_terms=True, index_dir=store.index, log=lambda m: None)
    card = store.home / "tiny-test" / "card.json"
    before = card.read_bytes()
    with pytest.raises(AbdomenSegError, match="exists. pass --overwrite"):
        model_store.install(str(store.zip), accept_terms=True, index_dir=store.index, log=lambda m: None)
    model_store.install(str(store.zip), accept_terms=True, overwrite=True, index_dir=store.index, log=lambda m: None)
    assert card.read_bytes() == before and _left_in(store.home) == ["catalog.json", "tiny-test"]


def test_a_zip_reaching_outside_its_folder_is_refused(store, tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("tiny-test/../../escaped.txt", "x")
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    index = json.loads((store.index / "catalog.json").read_text())
    index["models"][0]["download"].update(sha256=digest, size=evil.stat().st_size)
    (store.index / "catalog.json").write_text(json.dumps(index))
    with pytest.raises(AbdomenSegError, match="outside 'tiny-test/'"):
        model_store.install(str(evil), accept_terms=True, index_dir=store.index, log=lambda m: None)
    assert not (tmp_path / "escaped.txt").exists() and _left_in(store.home) == []


def test_cli_models_install(store, monkeypatch, capsys):
    monkeypatch.setattr(model_store, "shipped_catalog_dir", lambda: store.index)
    assert main(["models", "install", "tiny-test"]) == 2
    assert "--accept-terms" in capsys.readouterr().err
    assert main(["models", "install", "tiny-test", "--accept-terms"]) == 0
    assert "installed model 'tiny-test'" in capsys.readouterr().err
    assert "tiny-test" in catalog(store.home)


def test_a_shipped_entry_without_its_folder_is_found_in_the_user_folder(store, tmp_path, monkeypatch):
    # The packaged extension leaves the weights out: the shipped catalog lists the entry, the folder is absent.
    cards = catalog(store.index)
    assert cards == {}
    model_store.install("tiny-test", accept_terms=True, index_dir=store.index, log=lambda m: None)
    assert catalog(store.index)["tiny-test"].path == store.home / "tiny-test"
    monkeypatch.setenv("ABDOMENSEG_MODELS", str(tmp_path / "empty"))
    with pytest.raises(AbdomenSegError, match="not installed .*abdomenseg models install tiny-test"):
        find_model("tiny-test", store.index)


def test_first_use_of_a_research_only_model_asks_for_its_terms():
    # The shipped catalog states every model's terms; the BTCV-derived ones need explicit acceptance
    # (ExtensionsIndex .github/PULL_REQUEST_TEMPLATE.md asks for approval of non-permissive parts).
    entries = model_store.catalog_entries()
    assert {n for n, e in entries.items() if model_store.needs_acceptance(e)} == {
        "btcv-ct-3d-unet",
        "btcv-ct-2d-unet-r18",
        "btcv-ct-3d-fine-unet",
        "mr-any-3d-unet",
    }
    asked = model_store.terms_to_accept("btcv-ct-3d-unet+chaos-mr-t2-3d-unet", accepted={})
    assert [e["name"] for e in asked] == ["btcv-ct-3d-unet"]
    accepted = {"btcv-ct-3d-unet": entries["btcv-ct-3d-unet"]["terms"]["licence"]}
    assert model_store.terms_to_accept("btcv-ct-3d-unet", accepted) == []
    # The same licence accepted for one model covers the others under it (e.g. the fine second stage); another
    # licence, or terms that changed since, are asked again.
    assert model_store.terms_to_accept("btcv-ct-3d-fine-unet", accepted) == []
    assert [e["name"] for e in model_store.terms_to_accept("mr-any-3d-unet", accepted)] == ["mr-any-3d-unet"]
    assert model_store.terms_to_accept("btcv-ct-3d-unet", {"btcv-ct-3d-unet": "older terms"}) != []


def test_the_shipped_catalog_names_the_zips_models_pack_makes_of_the_shipped_packages(tmp_path):
    # What a release publishes (docs/slicer.md): `models pack` of each package; the catalog must name exactly those.
    for name, entry in model_store.catalog_entries().items():
        path, block = model_store.pack(model_store.shipped_catalog_dir() / entry["path"], tmp_path)
        assert (block["sha256"], block["size"]) == (entry["download"]["sha256"], entry["download"]["size"]), name
        assert entry["download"]["url"].endswith(f"/{name}.zip")
        path.unlink()


def test_models_lists_a_published_model_that_is_not_installed_with_how_to_get_it(store, monkeypatch, capsys):
    from AbdomenSegLib.models import packages

    monkeypatch.setattr(packages, "MODELS_DIR", store.index)  # a packaged extension: catalog, no package folders
    monkeypatch.setattr(model_store, "shipped_catalog_dir", lambda: store.index)
    monkeypatch.setenv("ABDOMENSEG_MODELS", str(store.home))
    assert main(["models"]) == 1
    out = capsys.readouterr().out
    assert "not installed: `abdomenseg models install tiny-test`" in out and "research use only (test)" in out


@pytest.mark.parametrize(
    "platform,env,expected",
    [
        ("win32", {"LOCALAPPDATA": "/L"}, "/L/AbdomenSeg/models"),
        ("darwin", {}, "HOME/Library/Application Support/AbdomenSeg/models"),
        ("linux", {"XDG_DATA_HOME": "/X"}, "/X/abdomenseg/models"),
        ("linux", {}, "HOME/.local/share/abdomenseg/models"),
        ("linux", {"ABDOMENSEG_MODELS": "/mine"}, "/mine"),
    ],
)
def test_models_home_is_the_per_user_data_folder(platform, env, expected, monkeypatch, tmp_path):
    for name in ("ABDOMENSEG_MODELS", "LOCALAPPDATA", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(locations.sys, "platform", platform)
    monkeypatch.setattr(locations.Path, "home", staticmethod(lambda: tmp_path))
    assert locations.models_home().as_posix() == expected.replace("HOME", tmp_path.as_posix())


@pytest.mark.parametrize("stage", ["downloaded", "unpacked"])
def test_a_full_disk_while_installing_is_named_and_nothing_stays(store, monkeypatch, stage):
    """ENOSPC while the zip arrives or unpacks: `no space left on device`, not "the download broke off"."""
    from test_io_disk_faults import FullDisk

    from AbdomenSegLib.core.errors import DiskFull

    trigger = (lambda p: p.name == "download.zip") if stage == "downloaded" else (lambda p: "unpacked" in p.parts)
    disk = FullDisk(monkeypatch, store.home.parent, trigger)
    with pytest.raises(DiskFull, match=f"no space left on device while writing the {stage} package"):
        model_store.install("tiny-test", accept_terms=True, index_dir=store.index, log=lambda m: None)
    assert disk.full
    assert _left_in(store.home) == []
