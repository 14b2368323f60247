"""Named public datasets: where each comes from, its files' sha256, and its terms of use.

`fetch(name)` returns verified local paths. Order: `$AIDC_DATA_MIRROR/<dir>/<file>` (a directory or an
http(s) URL laid out like upstream's file names), then the cache (`$AIDC_CACHE`, default
~/.cache/aidc), then the upstream URL. Every file is checked against its sha256 before use, and the
terms are shown once, the first time a dataset is fetched.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from aidc.errors import DataError
from aidc.storage import sha256_file

logger = logging.getLogger(__name__)

MIRROR_ENV = "AIDC_DATA_MIRROR"
CACHE_ENV = "AIDC_CACHE"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str
    url: str
    member: str | None = None  # path inside a zip archive at `url`


@dataclass(frozen=True)
class RemoteTree:
    """A folder of many files from a release archive, checked as a whole: `content_sha256` is the sha256 of the
    `sha256sum` lines of every file (`find <folder> -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`)."""

    folder: str  # e.g. recordings
    content_sha256: str
    url: str  # a .tar.gz release archive
    prefix: str  # the folder inside the archive that holds `folder`


@dataclass(frozen=True)
class CatalogEntry:
    dir: str
    description: str
    terms: str
    files: tuple[RemoteFile, ...] = ()
    tree: RemoteTree | None = None


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_ML = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
_SMS = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"

_FSDD = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"

CATALOG: dict[str, CatalogEntry] = {
    "fsdd": CatalogEntry(
        "fsdd",
        "Free Spoken Digit Dataset v1.0.10: 3,000 mono 8 kHz wav recordings, 6 speakers x 10 digits x 50 "
        "(Zohar Jackson et al.)",
        "CC BY-SA 4.0: credit \"Free Spoken Digit Dataset (FSDD), Zohar Jackson et al.\"; share changed copies of "
        "the data under the same licence.",
        tree=RemoteTree("recordings", "04e1baae96c6a26e39c623f2b01d0182ddae627ba0ac02a3cdc17ba2af99fd9b", _FSDD,
                        "free-spoken-digit-dataset-1.0.10"),
    ),
    "mnist": CatalogEntry(
        "mnist",
        "MNIST handwritten digits, 28x28, 60,000 train + 10,000 test (LeCun, Cortes, Burges)",
        "CC BY-SA 3.0 (copyright Y. LeCun and C. Cortes): credit the authors; share changed copies of the data "
        "under the same licence.",
        (
            RemoteFile("train-images-idx3-ubyte.gz",
                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                       _MNIST + "train-images-idx3-ubyte.gz"),
            RemoteFile("train-labels-idx1-ubyte.gz",
                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                       _MNIST + "train-labels-idx1-ubyte.gz"),
            RemoteFile("t10k-images-idx3-ubyte.gz",
                       "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                       _MNIST + "t10k-images-idx3-ubyte.gz"),
            RemoteFile("t10k-labels-idx1-ubyte.gz",
                       "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                       _MNIST + "t10k-labels-idx1-ubyte.gz"),
        ),
    ),
    "tinyshakespeare": CatalogEntry(
        "tinyshakespeare",
        "Tiny Shakespeare (char-rnn input.txt, 40,000 lines, 1,115,394 bytes)",
        "Public-domain texts; selection credit: A. Karpathy, char-rnn (2015, MIT).",
        (RemoteFile("input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),),
    ),
    "sms-spam": CatalogEntry(
        "sms-spam-collection",
        "SMS Spam Collection v.1: 5,574 SMS labelled ham/spam (Almeida & Gomez Hidalgo, 2011)",
        "Free to use; copyright T. A. Almeida and J. M. Gomez Hidalgo, no warranty (UCI: CC BY 4.0). "
        "Cite: Almeida et al., Contributions to the Study of SMS Spam Filtering, DOCENG'11.",
        (RemoteFile("SMSSpamCollection", "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
                    _SMS, member="SMSSpamCollection"),),
    ),
    "movielens": CatalogEntry(
        "movielens-latest-small",
        "MovieLens latest-small: 100,836 ratings by 610 users on 9,742 movies (GroupLens, 2018)",
        "Research use only, NO commercial use without GroupLens' permission; no endorsement implied; cite "
        "Harper & Konstan (2015), ACM TiiS 5(4):19; redistribute only under the same terms.",
        (
            RemoteFile("ratings.csv", "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
                       _ML, member="ml-latest-small/ratings.csv"),
            RemoteFile("movies.csv", "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
                       _ML, member="ml-latest-small/movies.csv"),
        ),
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/aidc")).expanduser() / "datasets"


def _verify(path: Path, f: RemoteFile, origin: str) -> Path:
    actual = sha256_file(path)
    if actual != f.sha256:
        raise DataError(
            f"{path} (from {origin}) fails its sha256 check: got {actual}, expected {f.sha256}. "
            f"The file is corrupt or a different version; delete it and fetch again, or fix {MIRROR_ENV}."
        )
    return path


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"cannot download {url}: {exc}. Without internet access, point {MIRROR_ENV} at a directory holding "
            "the dataset's files (e.g. ../shared/data)."
        ) from None
    tmp.replace(dest)


def _show_terms(name: str, entry: CatalogEntry, target: Path) -> None:
    marker = target / ".terms-shown"
    if not marker.exists():
        logger.warning("dataset %s: %s\n  Terms of use: %s", name, entry.description, entry.terms)
        target.mkdir(parents=True, exist_ok=True)
        marker.write_text(entry.terms + "\n")


def fetch(name: str, mirror: str | None = None) -> dict[str, Path]:
    """Verified local paths of a named dataset's files, keyed by file name."""
    if name not in CATALOG:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(CATALOG))}")
    entry = CATALOG[name]
    mirror = mirror or os.environ.get(MIRROR_ENV)
    cache = cache_dir() / entry.dir
    _show_terms(name, entry, cache)
    paths = {}
    for f in entry.files:
        if mirror and "://" not in mirror:
            local = Path(mirror).expanduser() / entry.dir / f.name
            if not local.is_file():
                raise DataError(f"{local} not found: {MIRROR_ENV}={mirror} must hold {entry.dir}/{f.name}")
            paths[f.name] = _verify(local, f, "the mirror")
            continue
        cached = cache / f.name
        if cached.is_file():
            paths[f.name] = _verify(cached, f, "the cache")
            continue
        if mirror:  # a URL mirror with upstream's file names
            _download(f"{mirror.rstrip('/')}/{entry.dir}/{f.name}", cached)
        elif f.member:
            archive = cache / Path(f.url).name.replace("+", "_")
            if not archive.is_file():
                _download(f.url, archive)
            with zipfile.ZipFile(archive) as z, z.open(f.member) as src, open(cached, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            _download(f.url, cached)
        paths[f.name] = _verify(cached, f, f.url)
    return paths


def tree_sha256(folder: Path) -> str:
    """sha256 of the `sha256sum` lines of every file under `folder`, paths relative to its parent, sorted as
    strings (`find <folder> -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`)."""
    import hashlib

    rels = sorted(p.relative_to(folder.parent).as_posix() for p in folder.rglob("*") if p.is_file())
    lines = [f"{sha256_file(folder.parent / rel)}  {rel}\n" for rel in rels]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def fetch_tree(name: str, mirror: str | None = None) -> Path:
    """The verified local folder of a named dataset published as a folder of many files (RemoteTree): from a
    local mirror (`<mirror>/<dir>/<folder>`), else the cache, else upstream's release archive."""
    entry = CATALOG[name]
    tree = entry.tree
    mirror = mirror or os.environ.get(MIRROR_ENV)
    cache = cache_dir() / entry.dir
    _show_terms(name, entry, cache)
    if mirror and "://" not in mirror:
        folder, origin = Path(mirror).expanduser() / entry.dir / tree.folder, "the mirror"
        if not folder.is_dir():
            raise DataError(f"{folder} not found: {MIRROR_ENV}={mirror} must hold {entry.dir}/{tree.folder}/")
    else:
        folder, origin = cache / tree.folder, "the cache"
        if not folder.is_dir():
            _extract_verified(tree, cache, folder, mirror)
            return folder
    actual = tree_sha256(folder)
    if actual != tree.content_sha256:
        raise DataError(f"{folder} (from {origin}) fails its content check: got {actual}, expected "
                        f"{tree.content_sha256}. Files are missing, changed or extra; delete the folder and fetch "
                        f"again, or fix {MIRROR_ENV}.")
    return folder


def _extract_verified(tree: RemoteTree, cache: Path, folder: Path, mirror: str | None) -> None:
    """Download the release archive (a URL mirror holds it as <dir>/<archive name>), extract `tree.folder` into a
    private temporary folder, check its content, then move it into the cache; a bad archive is deleted."""
    import tarfile
    import tempfile

    archive = cache / Path(tree.url).name
    url = f"{mirror.rstrip('/')}/{cache.name}/{archive.name}" if mirror else tree.url
    if not archive.is_file():
        _download(url, archive)
    part = Path(tempfile.mkdtemp(dir=cache, prefix=tree.folder + "."))
    try:
        try:
            with tarfile.open(archive) as tar:
                inside = f"{tree.prefix}/{tree.folder}/"
                members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(inside)]
                for m in members:
                    m.name = m.name.removeprefix(inside)
                tar.extractall(part, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            archive.unlink(missing_ok=True)
            raise DataError(f"{archive} (from {url}) is not a readable release archive ({exc}); it was deleted: "
                            "fetch again") from None
        actual = tree_sha256(part)
        if actual != tree.content_sha256:
            archive.unlink(missing_ok=True)
            raise DataError(f"the {tree.folder}/ of {archive.name} (from {url}) fails its content check: got "
                            f"{actual}, expected {tree.content_sha256}; the archive was deleted: fetch again, or "
                            f"fix {MIRROR_ENV}.")
        try:
            part.replace(folder)
        except OSError:  # another run put a verified copy there first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
