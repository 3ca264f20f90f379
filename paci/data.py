"""Token data: the embedded corpus, text files and nanoGPT ``.bin`` memmaps, and their batches.

Sources (``load_data(path)``):

* ``None``: the embedded corpus, 42 Shakespeare works from Project Gutenberg
  (``paci/corpus/shakespeare.jsonl.gz``; see ``paci/corpus/README.md``).
* a text file, or a folder of ``*.txt`` files (recursive, sorted by relative path; empty files
  skipped): each file is one document.
* a folder holding nanoGPT-style ``train.bin`` and ``val.bin`` (uint16 token ids): read through
  ``np.memmap``, never loaded whole. Vocabulary size from ``meta.json`` (``{"vocab_size": N}``)
  if present, else 1 + the largest id (computed once, then cached). No tokenizer.

Train/validation split, always by whole documents where there are enough of them:

* 10 or more documents (sorted by name): every 10th one (index 9, 19, 29, ...) is validation.
  For the embedded corpus: henry_v_gut, macbeth_gut, rape_of_lucrece_gut, twelfth_night_gut
  (4 of 42 works, 9.0% of the characters).
* fewer (a single file, a small folder): the text after the first line break at or past 90% of
  all characters is validation; the cut is always at a line boundary.

Text is tokenized by a byte-level BPE (HF ``tokenizers``) trained on the train documents only.
Documents are joined by one ``<|endoftext|>`` token (id 0); the 256 byte symbols follow, so the
smallest vocabulary is 257. The tokenizer and the uint16 token arrays are cached in
``$PACI_CACHE`` (default ``~/.cache/paci``) under a key hashing the corpus content, the
vocabulary size and the tokenizer settings; each cache entry is built in a temporary folder and
moved into place with ``os.replace``, so it is either complete or absent.

Batches are pure functions of their arguments, numbered by sequence rather than by micro-batch:
train sequence g is a window of the train split at an offset drawn with
``np.random.default_rng([seed, g])``, and micro-batch mb of b sequences holds sequences
mb*b ... mb*b+b-1. Every process can rebuild micro-batch ``mb`` alone, and a mini-batch holds the
same sequences however many micro-batches it is cut into (so runs at different M are comparable).
``val_batch(i, ...)`` reads fixed, non-overlapping windows of the val split, also numbered by
sequence, so an evaluation of E sequences is the same E windows at any batch size.
"""

import functools
import gzip
import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from paci.checks import check_integer
from paci.files import write_bytes

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # the end-of-text token + 256 byte symbols
MAX_VOCAB_SIZE = 65535  # ids must fit in uint16
VAL_EVERY = 10  # with >= VAL_EVERY documents, document i is validation iff i % VAL_EVERY == VAL_EVERY - 1
VAL_FRACTION = 0.1  # with fewer documents, about this share of the characters (whole lines) is validation
CORPUS_FILE = "shakespeare.jsonl.gz"
TOKENIZER_SETTINGS = {  # part of the cache key: change anything here and old entries are ignored
    "format": 1, "model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
    "min_frequency": 2, "special_tokens": [EOT], "separator": "eot-between-documents",
    "split": f"every-{VAL_EVERY}th-document-else-last-{VAL_FRACTION}-of-lines",
}
_CHUNK_CHARS = 1 << 16  # encode_batch works on pieces of about this size
# A cut "after a newline that follows a non-space, before a non-space" keeps the byte-level
# pre-tokenization unchanged, so encoding the pieces gives exactly the tokens of the whole text.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_ENTRY_FILES = ("meta.json", "tokenizer.json", "train.bin", "val.bin")  # one tokenized-cache entry
_BIN_CHUNK = 1 << 24  # tokens per step when scanning a .bin file for its largest id

Document = tuple[str, str]  # (name, text)


class DataError(ValueError):
    """Unusable data or data settings (a corpus, or what `paci.Pipeline.fit` is given: data that ran
    out, a mini-batch of the wrong form); the message says what is wrong and what to do."""


class TokenData:
    """Train and validation token arrays (uint16, possibly memmaps) with their batch samplers."""

    def __init__(self, train: np.ndarray, val: np.ndarray, vocab_size: int,
                 tokenizer: Tokenizer | None = None, *, source: str = "",
                 val_documents: tuple[str, ...] = (), cached: bool = False):
        self.train = train
        self.val = val
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.source = source
        self.val_documents = val_documents
        self.cached = cached  # True when this load read an existing cache entry

    @property
    def train_tokens(self) -> int:
        return len(self.train)

    @property
    def val_tokens(self) -> int:
        return len(self.val)

    def __repr__(self) -> str:
        return (f"TokenData(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"train_tokens={self.train_tokens:,}, val_tokens={self.val_tokens:,})")

    def check_fits(self, batch_size: int, seq_len: int) -> None:
        """Raise DataError unless each split holds one batch of distinct (batch_size, seq_len) windows."""
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        need = batch_size * seq_len + 1
        for split, have in (("train", self.train_tokens), ("validation", self.val_tokens)):
            if have < need:
                raise DataError(
                    f"the {split} split of {self.source} has {have:,} tokens but one batch of "
                    f"batch_size={batch_size} x seq_len={seq_len} needs {need:,}: "
                    f"use more text or a smaller batch_size/seq_len")

    def batch(self, seed: int, microbatch: int, batch_size: int,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, (batch_size, seq_len)) of micro-batch ``microbatch``.

        Micro-batch ``mb`` holds the train sequences ``mb * batch_size ... mb * batch_size +
        batch_size - 1``, and sequence ``g`` is the window starting at an offset drawn by
        ``np.random.default_rng([seed, g])``. So a batch is a pure function of the arguments, and
        a mini-batch of M micro-batches of B/M sequences holds the same B sequences whatever M is.
        Targets are inputs shifted by one.
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if seed < 0 or microbatch < 0:
            raise ValueError(f"seed ({seed}) and microbatch ({microbatch}) must be >= 0")
        if self.train_tokens <= seq_len:
            self.check_fits(1, seq_len)
        high = self.train_tokens - seq_len
        first = microbatch * batch_size
        starts = np.array([np.random.default_rng([seed, g]).integers(0, high) for g in range(first, first + batch_size)],
                          dtype=np.int64)
        return _windows(self.train, starts, seq_len)

    def num_val_batches(self, batch_size: int, seq_len: int) -> int:
        """How many validation batches of this shape exist (windows never overlap)."""
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        return (self.val_tokens - 1) // seq_len // batch_size

    def val_batch(self, index: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch ``index`` of ``num_val_batches``: fixed windows, no randomness.

        The val split is cut into W consecutive windows of seq_len (+1 for the target). Batch i
        holds the val sequences ``i * batch_size ...``, and sequence g is window ``g * stride mod
        W`` with a stride near 0.618 W that is coprime to W: distinct sequences are distinct
        windows, the first few sequences already spread over the whole split, and an evaluation
        of E sequences reads the same E windows whatever the batch size.
        """
        count = self.num_val_batches(batch_size, seq_len)
        if not 0 <= index < count:
            if count == 0:
                self.check_fits(batch_size, seq_len)
            raise IndexError(f"validation batch {index} out of range: there are {count}")
        windows = (self.val_tokens - 1) // seq_len
        sequences = np.arange(index * batch_size, (index + 1) * batch_size, dtype=np.int64)
        starts = sequences * _spreading_stride(windows) % windows * seq_len
        return _windows(self.val, starts, seq_len)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (needs a tokenizer, so not for .bin data)."""
        if self.tokenizer is None:
            raise DataError(f"{self.source} has no tokenizer (token .bin files): encode text elsewhere")
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of token ids; for .bin data without a tokenizer, the ids separated by spaces."""
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_integer(name, value)


@functools.cache
def _spreading_stride(count: int) -> int:
    """The integer nearest 0.618 * count (the golden ratio's fraction) that is coprime to count;
    cached, since every validation batch of a split asks for the same one."""
    target = round(count * (math.sqrt(5) - 1) / 2)
    return min((s for s in range(1, count + 1) if math.gcd(s, count) == 1), key=lambda s: (abs(s - target), s))


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# ---------------------------------------------------------------- entry point

def load_data(path: str | os.PathLike | None = None, vocab_size: int = 4096,
              cache_dir: str | os.PathLike | None = None,
              batch_shape: tuple[int, int] | None = None) -> TokenData:
    """Load a corpus as TokenData: None (embedded corpus), a text file/folder, or a .bin folder.

    With `batch_shape` (batch_size, seq_len), a corpus whose splits cannot hold one such batch
    is refused (`TokenData.check_fits`), before its tokens are cached.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size!r} is out of range: choose an integer in "
                        f"[{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (token ids are stored as uint16)")
    vocab_size = int(vocab_size)
    cache = resolve_cache_dir(cache_dir)
    if batch_shape is not None:
        _check_positive(batch_size=batch_shape[0], seq_len=batch_shape[1])
    if path is None:
        blob = _corpus_path().read_bytes()
        return _tokenized(_sha256(blob), lambda: corpus_documents(blob), "embedded corpus",
                          vocab_size, cache, batch_shape)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass an existing text file or folder, "
                        f"or leave it unset for the embedded corpus")
    if path.is_dir() and ((path / "train.bin").exists() or (path / "val.bin").exists()):
        data = _load_bin(path, cache)
        if batch_shape is not None:
            data.check_fits(*batch_shape)
        return data
    if path.is_file() and path.suffix == ".bin":
        raise DataError(f"{path} is a token file: pass the folder holding train.bin and val.bin")
    docs = _read_text(path)
    digest = _sha256(json.dumps(docs).encode("utf-8"))
    return _tokenized(digest, lambda: docs, str(path), vocab_size, cache, batch_shape)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$PACI_CACHE``, else ``~/.cache/paci``."""
    chosen = cache_dir or os.environ.get("PACI_CACHE") or Path.home() / ".cache" / "paci"
    return Path(chosen).expanduser()


# ---------------------------------------------------------------- documents and the split

def _corpus_path() -> Path:
    path = Path(str(importlib.resources.files(__package__ or "paci") / "corpus" / CORPUS_FILE))
    if not path.is_file():
        raise DataError(f"embedded corpus {path} is missing: reinstall paci, or pass a data path")
    return path


def corpus_documents(blob: bytes | None = None) -> list[Document]:
    """The embedded corpus as (title, text) documents, sorted by title."""
    blob = _corpus_path().read_bytes() if blob is None else blob
    records = [json.loads(line) for line in gzip.decompress(blob).decode("utf-8").splitlines()]
    return sorted((r["title"], r["text"]) for r in records)


def _read_text(path: Path) -> list[Document]:
    files = [path] if path.is_file() else sorted(
        (p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise DataError(f"folder {path} has no usable data: add *.txt files (searched recursively) "
                        f"or nanoGPT train.bin + val.bin")
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}): "
                            f"convert it to UTF-8 or remove it") from None
        if text.strip():
            docs.append((file.name if file == path else file.relative_to(path).as_posix(), text))
    if not docs:
        raise DataError(f"{path} holds only empty text: add text to it")
    return docs


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val): every VAL_EVERY-th document, or else the last lines."""
    if len(docs) >= VAL_EVERY:
        val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
        return train, val
    total = sum(len(text) for _, text in docs)
    target = int(total * (1 - VAL_FRACTION))
    offset = 0
    for k, (name, text) in enumerate(docs):
        if offset + len(text) > target:
            cut = text.find("\n", target - offset) + 1 or len(text)
            val = ([(f"{name} (last lines)", text[cut:])] if text[cut:] else []) + docs[k + 1:]
            return docs[:k] + [(name, text[:cut])], val
        offset += len(text)
    return docs, []


# ---------------------------------------------------------------- tokenizer and cache

def _tokenized(content_digest: str, read_docs, source: str, vocab_size: int, cache: Path,
               batch_shape: tuple[int, int] | None = None) -> TokenData:
    """TokenData for text documents, from the cache or built (then cached) on a miss."""
    key = _sha256(json.dumps([content_digest, vocab_size, TOKENIZER_SETTINGS]).encode())
    entry = cache / f"tokens-v{vocab_size}-{key[:16]}"
    cached = entry.is_dir()
    if not cached:
        _build_entry(entry, read_docs(), source, vocab_size, batch_shape)
    missing = [name for name in _ENTRY_FILES if not (entry / name).is_file()]
    if missing:
        raise DataError(f"cache entry {entry} lacks {', '.join(missing)}: delete that folder and retry")
    meta = json.loads((entry / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    train, val = (np.memmap(entry / f"{split}.bin", dtype=np.uint16, mode="r") for split in ("train", "val"))
    data = TokenData(train, val, meta["vocab_size"], tokenizer, source=source,
                     val_documents=tuple(meta["val_documents"]), cached=cached)
    if batch_shape is not None:
        data.check_fits(*batch_shape)
    logger.info("%s: %s train / %s val tokens, vocab %d%s", source, f"{len(train):,}",
                f"{len(val):,}", meta["vocab_size"], " (cached)" if cached else "")
    return data


def _build_entry(entry: Path, docs: list[Document], source: str, vocab_size: int,
                 batch_shape: tuple[int, int] | None = None) -> None:
    """Train, encode and write one cache entry atomically (a temp folder, then os.replace); a
    corpus too small for one batch of `batch_shape` is refused before anything is written."""
    train_docs, val_docs = split_documents(docs)
    if not val_docs:
        raise DataError(f"{source} is too small to hold out validation text (it needs a line break "
                        f"after the first 90% of its characters): add text or more files")
    start = time.perf_counter()
    tokenizer = _train_tokenizer([text for _, text in train_docs], vocab_size)
    trained = time.perf_counter()
    arrays = {split: _encode(tokenizer, [text for _, text in part])
              for split, part in (("train", train_docs), ("val", val_docs))}
    if batch_shape is not None:
        TokenData(arrays["train"], arrays["val"], vocab_size, source=source).check_fits(*batch_shape)
    logger.info("%s: trained a %d-token BPE on %d documents in %.1f s, encoded in %.1f s", source,
                tokenizer.get_vocab_size(), len(train_docs), trained - start, time.perf_counter() - trained)
    if tokenizer.get_vocab_size() < vocab_size:
        logger.warning("%s: only %d tokens learnt (asked for %d); the text is small",
                       source, tokenizer.get_vocab_size(), vocab_size)
    meta = {"source": source, "vocab_size": tokenizer.get_vocab_size(), "settings": TOKENIZER_SETTINGS,
            "train_documents": [n for n, _ in train_docs], "val_documents": [n for n, _ in val_docs]}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    except OSError as err:
        raise DataError(f"cannot write the cache folder {entry.parent} ({err.strerror}): "
                        f"set PACI_CACHE to a writable folder") from None
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        for split, ids in arrays.items():
            ids.tofile(tmp / f"{split}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
            logger.debug("%s was written by another process; using that one", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((piece for text in texts for piece in _pieces(text)), trainer)
    return tokenizer


def _encode(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Tokens of the texts joined by the end-of-text token, as uint16."""
    eot = np.array([tokenizer.token_to_id(EOT)], dtype=np.uint16)
    pieces = [list(_pieces(text)) for text in texts]
    encodings = iter(tokenizer.encode_batch_fast([p for ps in pieces for p in ps]))  # one parallel call
    parts = []
    for i, text_pieces in enumerate(pieces):
        parts.extend([eot] if i else [])
        parts.extend(np.array(next(encodings).ids, dtype=np.uint16) for _ in text_pieces)
    return np.concatenate(parts)


def _pieces(text: str, size: int = _CHUNK_CHARS):
    """Cut text at safe line breaks into pieces of about ``size`` characters (see _SAFE_CUT)."""
    start = 0
    while len(text) - start > size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- nanoGPT .bin folders

def _load_bin(folder: Path, cache: Path) -> TokenData:
    """TokenData over memmaps of folder/train.bin and folder/val.bin (uint16 token ids)."""
    files = {split: folder / f"{split}.bin" for split in ("train", "val")}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f"{folder} has {' and '.join(f.name for f in files.values() if f.is_file())} "
                        f"but no {missing[0]}: add it (nanoGPT prepare.py writes both)")
    arrays = {}
    for split, file in files.items():
        size = file.stat().st_size
        if size == 0 or size % 2:
            raise DataError(f"{file} has {size} bytes, not a non-empty array of uint16 tokens: "
                            f"rewrite it with np.array(ids, dtype=np.uint16).tofile(...)")
        arrays[split] = np.memmap(file, dtype=np.uint16, mode="r")
    vocab_size = _bin_vocab_size(folder, files, arrays, cache)
    logger.info("%s: %s train / %s val tokens (memmap), vocab %d", folder,
                f"{len(arrays['train']):,}", f"{len(arrays['val']):,}", vocab_size)
    return TokenData(arrays["train"], arrays["val"], vocab_size, None, source=str(folder))


def _bin_vocab_size(folder: Path, files: dict, arrays: dict, cache: Path) -> int:
    """meta.json's vocab_size, else 1 + the largest id. The largest id is scanned in chunks once,
    then cached (only for files that pass): an id at or past meta.json's vocab_size is refused."""
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files.values()]
    entry = cache / f"bin-vocab-{_sha256(json.dumps(stamp).encode())[:16]}.json"
    scanned = not entry.is_file()
    if scanned:
        largest = max(int(a[i:i + _BIN_CHUNK].max()) for a in arrays.values()
                      for i in range(0, len(a), _BIN_CHUNK))
    else:
        largest = json.loads(entry.read_text())["vocab_size"] - 1
    vocab_size = largest + 1
    meta = folder / "meta.json"
    if meta.is_file():
        vocab_size = _declared_vocab_size(meta)
        if largest >= vocab_size:
            raise DataError(f"{folder}: the token files hold id {largest}, but {meta} declares vocab_size="
                            f"{vocab_size}, so the model's embedding has no row for it: set vocab_size to at least "
                            f"{largest + 1} in meta.json, or fix the .bin files")
    if scanned:
        try:
            write_bytes(entry, json.dumps({"vocab_size": largest + 1, "files": stamp}).encode())
        except OSError as err:
            logger.warning("could not cache the vocabulary size in %s (%s)", entry, err.strerror)
    return vocab_size


def _declared_vocab_size(meta: Path) -> int:
    try:
        vocab_size = json.loads(meta.read_text())["vocab_size"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{meta} is not JSON with an integer 'vocab_size': fix or delete it") from None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not 1 <= vocab_size <= MAX_VOCAB_SIZE + 1:
        raise DataError(f"{meta} has vocab_size={vocab_size!r}: it must be an integer in "
                        f"[1, {MAX_VOCAB_SIZE + 1}] for uint16 tokens")
    return vocab_size
