"""Model packages that live outside the extension: packed as zip files (release assets), fetched with their sha256
checked, and installed atomically into the user's model folder.

The trusted list is the shipped catalog (Resources/models/catalog.json). An entry may carry a `download` block:

    {"name": "btcv-ct-3d-unet", "path": "btcv-ct-3d-unet",
     "terms": {"licence": "research use only (BTCV)", "permissive": false, "text": "<what the user accepts>"},
     "download": {"url": "https://.../btcv-ct-3d-unet.zip", "sha256": "<zip's sha256>", "size": 17823456}}

`install(source)` takes a catalog name, an http(s) URL or a local .zip; whatever the source, the zip's sha256 must
be one the catalog names (so a URL can only ever install a package the extension lists), its size must match, and
non-permissive terms must be accepted. The package lands in `models_home()` (ABDOMENSEG_MODELS, else a per-user data
folder) under its catalog path, registered in that folder's catalog.json; nothing is half-installed: the download
and the unpacked folder are temporaries beside the target, renamed into place only after every check passed.
models/packages.py looks a shipped catalog entry whose folder is absent up in models_home().
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.files import NO_SPACE, no_space_error
from AbdomenSegLib.models.locations import models_home
from AbdomenSegLib.models.packages import sha256_of

# (bytes done, bytes expected or None) during a download
DownloadProgress = Callable[[int, "int | None"], None]
PACKAGE_FILES = ("card.json",)  # and the weights file the card names; *.md notes are allowed too
MAX_UNPACKED = 4 << 30  # refuse zips that unpack to more than 4 GiB (the shipped packages are < 60 MB)
CHUNK = 1 << 20


def shipped_catalog_dir() -> Path:
    from AbdomenSegLib.models.packages import RESOURCES

    return RESOURCES / "models"


def downloadable(index_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """name -> catalog entry for every entry of the shipped catalog that has a download block."""
    from AbdomenSegLib.models.packages import read_catalog

    index = read_catalog(index_dir or shipped_catalog_dir()) or {}
    return {e["name"]: e for e in index.get("models", []) if isinstance(e.get("download"), dict)}


def terms_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry's terms block ({} when the catalog states none)."""
    return entry.get("terms") or {}


def needs_acceptance(entry: dict[str, Any]) -> bool:
    """True unless the entry's terms say they are permissive."""
    return not terms_of(entry).get("permissive", False)


def describe(entry: dict[str, Any]) -> str:
    """What the user is shown before an installation: the model, its download size and its terms."""
    download = entry["download"]
    size = download.get("size")
    terms = terms_of(entry)
    lines = [f"Model '{entry['name']}': download {size / 1e6:.0f} MB" if size else f"Model '{entry['name']}'"]
    lines.append(f"Terms: {terms.get('licence', 'not stated')}")
    if terms.get("text"):
        lines.append(terms["text"])
    return "\n".join(lines)


# -- packing (publishing side) -----------------------------------------------------------------------------------------
def pack(package_dir: str | Path, out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Zip a model package as `<out_dir>/<name>.zip` (members `<name>/card.json`, `<name>/<weights>`) and return it
    with the catalog `download` block to publish it under (url left for the release's asset address)."""
    from AbdomenSegLib.io.files import atomic_output
    from AbdomenSegLib.models.packages import read_card

    card = read_card(package_dir)
    weights = card.weights_path
    if sha256_of(weights) != card["sha256"]:
        raise AbdomenSegError(f"weights of '{card.name}' do not match its card", "re-export the package")
    out = Path(out_dir) / f"{card.name}.zip"
    with atomic_output(out, ".zip") as tmp:
        # Stored, not deflated: safetensors weights do not compress, and a fixed date keeps the zip reproducible.
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for path in (card.path / "card.json", weights):
                info = zipfile.ZipInfo(f"{card.name}/{path.name}", date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with open(path, "rb") as source, archive.open(info, "w") as target:
                    shutil.copyfileobj(source, target, CHUNK)
    return out, {"url": "", "sha256": sha256_of(out), "size": out.stat().st_size}


# -- fetching ------------------------------------------------------------------------------------------------------
def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def download(
    url: str, target: Path, expected_size: int | None = None, progress: DownloadProgress | None = None
) -> None:
    """`url` into the file `target`, refused (AbdomenSegError) when it arrives short of its Content-Length or of
    `expected_size`."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http(s) only: _is_url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AbdomenSegError(
            f"cannot download '{url}' ({exc})", "check the address and the network connection"
        ) from None
    with response, open(target, "wb") as out:
        header = response.headers.get("Content-Length")
        total = int(header) if header and header.isdigit() else expected_size
        done = 0
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        except (http.client.IncompleteRead, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                raise no_space_error("the downloaded package", target, exc) from None
            raise AbdomenSegError(
                f"the download of '{url}' broke off after {done} bytes ({type(exc).__name__})", "try again"
            ) from None
    announced = int(header) if header and header.isdigit() else None
    for expected, what in ((announced, "the server announced"), (expected_size, "the catalog names")):
        if expected is not None and done != expected:
            raise AbdomenSegError(
                f"the download of '{url}' is incomplete or altered: {done} bytes, {what} {expected}",
                "try again; if it persists, the published file differs from the one this AbdomenSeg lists",
            )


# -- installing ---------------------------------------------------------------------------------------------------
def _entry_for(source: str, catalog: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if source in catalog:
        return catalog[source]
    return next((e for e in catalog.values() if e["download"].get("url") == source), None)


def _check_members(archive: zipfile.ZipFile, name: str) -> list[zipfile.ZipInfo]:
    """The zip's file members, refused unless all lie in `<name>/` as plain files with safe names."""
    members, total = [], 0
    for info in archive.infolist():
        if info.is_dir():
            continue
        path = PurePosixPath(info.filename)
        mode = info.external_attr >> 16
        if (
            path.is_absolute()
            or ".." in path.parts
            or "\\" in info.filename
            or len(path.parts) != 2
            or path.parts[0] != name
            or (mode and (mode & 0o170000) not in (0, 0o100000))  # symlinks and devices refused
        ):
            raise AbdomenSegError(
                f"the package zip holds '{info.filename}', outside '{name}/' or not a plain file",
                "a package zip holds only <name>/card.json and <name>/<weights>; use one made by `models pack`",
            )
        total += info.file_size
        members.append(info)
    if total > MAX_UNPACKED:
        raise AbdomenSegError(f"the package zip unpacks to {total} bytes", "this is not an AbdomenSeg model package")
    return members


def _unpack(zip_path: Path, entry: dict[str, Any], staging: Path) -> Path:
    """Unpack into `staging/<name>` and check it is the package the catalog entry names (card, weights sha256)."""
    from AbdomenSegLib.models.packages import read_card

    name = entry["name"]
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in _check_members(archive, name):
                target = staging / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
    except zipfile.BadZipFile as exc:
        raise AbdomenSegError(f"'{zip_path.name}' is not a valid zip ({exc})", "download it again") from None
    except OSError as exc:
        if exc.errno in NO_SPACE:  # the staging folder is removed with what it holds
            raise no_space_error("the unpacked package", staging, exc) from None
        raise
    card = read_card(staging / name)
    if card.name != name:
        raise AbdomenSegError(
            f"the package holds model '{card.name}', not '{name}'", "use the package the catalog names"
        )
    if sha256_of(card.weights_path) != card["sha256"]:
        raise AbdomenSegError(f"the weights in the package of '{name}' do not match its card", "download it again")
    return Path(staging / name)


def install(
    source: str,
    *,
    accept_terms: bool = False,
    overwrite: bool = False,
    target_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
    progress: DownloadProgress | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Install the package `source` (a catalog name, an http(s) URL or a local .zip) into `target_dir`
    (default models_home()) and register it there; returns the package folder. `index_dir`: the trusted catalog
    (default: the shipped one)."""
    catalog = downloadable(index_dir)
    if not catalog:
        raise AbdomenSegError("the model catalog lists no downloadable package", "reinstall AbdomenSeg")
    target_dir = Path(target_dir or models_home())
    target_dir.mkdir(parents=True, exist_ok=True)
    entry = _entry_for(source, catalog)
    local = None if entry is not None and not Path(source).is_file() else Path(source)
    if local is None and entry is not None:
        source = entry["download"].get("url") or ""
        if not source:
            raise AbdomenSegError(f"the catalog names no address for '{entry['name']}'", "install it from a .zip file")
    elif local is not None and not local.is_file() and not _is_url(source):
        raise AbdomenSegError(
            f"'{source}' is neither an installable model, an http(s) address nor a .zip file",
            f"installable models: {', '.join(catalog)}",
        )
    with tempfile.TemporaryDirectory(prefix=".part-install-", dir=target_dir) as staging_root:
        staging = Path(staging_root)
        if local is not None and local.is_file():
            zip_path = local
        else:
            zip_path = staging / "download.zip"
            log(f"downloading {source}")
            download(source, zip_path, entry["download"].get("size") if entry else None, progress)
        digest = sha256_of(zip_path)
        found = next((e for e in catalog.values() if e["download"].get("sha256") == digest), None)
        if found is None or (entry is not None and found is not entry):
            expected = entry["download"].get("sha256", "?")[:12] if entry else None
            raise AbdomenSegError(
                f"'{source}' has sha256 {digest[:12]}…, "
                + (
                    f"not the {expected}… the catalog names for '{entry['name']}'"
                    if entry
                    else "which is no package the catalog names"
                ),
                "the file is corrupt or not a published AbdomenSeg package; download it again from the release page",
            )
        entry = found
        if needs_acceptance(entry) and not accept_terms:
            raise AbdomenSegError(
                f"model '{entry['name']}' comes under terms that need your acceptance: "
                f"{terms_of(entry).get('licence', 'not stated')}",
                "read them (`abdomenseg models`, Resources/models/TERMS.md) and pass --accept-terms to accept them",
            )
        unpacked = _unpack(zip_path, entry, staging / "unpacked")
        final = Path(target_dir / entry.get("path", entry["name"]))
        _place(unpacked, final, overwrite, staging)
    _register(target_dir, entry)
    log(f"installed model '{entry['name']}' in {final}")
    return final


def _place(unpacked: Path, final: Path, overwrite: bool, staging: Path) -> None:
    """Rename the checked package into place in one step; an existing one only with `overwrite` (moved aside first,
    removed with the staging folder)."""
    if final.exists():
        if not overwrite:
            raise AbdomenSegError(f"'{final}' exists", "pass --overwrite to replace the installed package")
        final.rename(staging / "previous")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(unpacked, final)


def _register(target_dir: Path, entry: dict[str, Any]) -> None:
    """List the package in the target folder's catalog.json (created, with the shipped default, if absent)."""
    from AbdomenSegLib.io.files import write_json
    from AbdomenSegLib.models.packages import default_model_name, read_catalog

    index = read_catalog(target_dir) or {"default": default_model_name(shipped_catalog_dir()), "models": []}
    names = [e["name"] for e in index["models"]]
    if entry["name"] in names:
        index["models"][names.index(entry["name"])] = dict(entry)
    else:
        index["models"].append(dict(entry))
    if index["default"] not in [e["name"] for e in index["models"]]:  # the shipped default is not installed here
        index["default"] = entry["name"]
    write_json(index, target_dir / "catalog.json")


def catalog_entries(index_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """name -> entry of every model the shipped catalog lists."""
    from AbdomenSegLib.models.packages import read_catalog

    index = read_catalog(index_dir or shipped_catalog_dir()) or {}
    return {e["name"]: e for e in index.get("models", [])}


def terms_to_accept(model: str, accepted: dict[str, str], index_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The catalog entries behind `model` (a name, or names joined by '+') whose terms are not permissive and not yet
    accepted (`accepted`: name -> the licence text the user accepted, e.g. kept in Slicer's settings). Terms accepted
    for one model count for every model under the same licence text (the BTCV models, a cascade's fine stage)."""
    entries = catalog_entries(index_dir)
    wanted = [entries[n] for n in str(model or "").split("+") if n in entries]
    agreed = {text for text in accepted.values() if text}
    return [e for e in wanted if needs_acceptance(e) and terms_of(e).get("licence") not in agreed]
