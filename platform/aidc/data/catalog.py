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
class CatalogEntry:
    dir: str
    description: str
    terms: str
    files: tuple[RemoteFile, ...]


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_ML = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
_SMS = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"

CATALOG: dict[str, CatalogEntry] = {
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
