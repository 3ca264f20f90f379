"""Token data: pure batches, split by document, tokenizer round trip, cache reuse, .bin memmaps, bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from paci import data
from paci.data import EOT, DataError, TokenData, load_data

WORDS = ("the king queen doth thou art fair my lord sweet love night day sword crown speak "
         "hark what light through yonder window breaks o romeo wherefore").split()


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Every test caches under its own tmp folder, never in the user's home."""
    monkeypatch.setenv("PACI_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> TokenData:
    """The embedded corpus at the default vocabulary, built once per session."""
    return load_data(None, cache_dir=tmp_path_factory.mktemp("corpus-cache"))


def _write_texts(folder: Path, num_files: int, lines: int = 200, seed: int = 0) -> list[Path]:
    """Small files of pseudo-English lines, deterministic in seed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_files):
        text = "".join(" ".join(rng.choice(WORDS, size=8)).capitalize() + ".\n" for _ in range(lines))
        paths.append(folder / f"doc{i:02d}.txt")
        paths[-1].write_text(text)
    return paths


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


def test_batch_is_pure_function_of_seed_and_microbatch(tmp_path):
    """Two separately loaded TokenData give identical batches for the same (seed, mb)."""
    _write_texts(tmp_path / "txt", 3)
    first = load_data(tmp_path / "txt", vocab_size=300)
    second = load_data(tmp_path / "txt", vocab_size=300, cache_dir=tmp_path / "other-cache")
    assert not first.cached and not second.cached
    for seed, mb in [(0, 0), (1, 7), (123, 4)]:
        for a, b in zip(first.batch(seed, mb, 4, 32), second.batch(seed, mb, 4, 32)):
            assert torch.equal(a, b)


def test_batch_same_in_subprocess(corpus, tmp_path):
    """A fresh process regenerates micro-batch mb's tensors bit for bit (no communication needed)."""
    x, y = corpus.batch(5, 11, 4, 64)
    code = ("import hashlib, sys; from paci.data import load_data\n"
            "x, y = load_data(None, cache_dir=sys.argv[1]).batch(5, 11, 4, 64)\n"
            "print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())\n")
    cache = Path(corpus.train.filename).parent.parent
    root = str(Path(data.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True,
                         timeout=120, env=env, check=True)
    assert out.stdout.strip() == hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def test_batch_microbatches_differ(corpus):
    """Different micro-batch indices (or seeds) draw different batches."""
    batches = [corpus.batch(0, mb, 4, 32)[0] for mb in range(8)] + [corpus.batch(1, 0, 4, 32)[0]]
    for i, a in enumerate(batches):
        for b in batches[i + 1:]:
            assert not torch.equal(a, b)


def test_batch_targets_are_inputs_shifted_by_one(corpus):
    """y[:, t] is the token after x[:, t]; both int64 (batch_size, seq_len) windows of the train split."""
    x, y = corpus.batch(3, 2, 6, 48)
    assert x.shape == y.shape == (6, 48) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(np.asarray(corpus.train, dtype=np.int64))
    for row_x, row_y in zip(x, y):
        candidates = np.flatnonzero(np.asarray(corpus.train[:-48]) == int(row_x[0]))
        assert any(torch.equal(train[s:s + 48], row_x) and torch.equal(train[s + 1:s + 49], row_y)
                   for s in candidates)


def test_val_batches_are_distinct_windows_of_the_val_split(corpus):
    """Validation rows are fixed, non-overlapping windows; all batches together are every window once."""
    B, T = 4, 128
    n = corpus.num_val_batches(B, T)
    assert n == (corpus.val_tokens - 1) // T // B > 0
    windows = (corpus.val_tokens - 1) // T
    val = torch.from_numpy(corpus.val[:windows * T].astype(np.int64)).view(windows, T)
    rows = torch.cat([corpus.val_batch(i, B, T)[0] for i in range(n)])
    index = {tuple(row.tolist()): w for w, row in enumerate(val)}
    found = [index[tuple(row.tolist())] for row in rows]
    assert len(set(found)) == n * B  # distinct windows
    assert max(found[:8]) - min(found[:8]) > windows // 2  # the first few already spread over the split
    with pytest.raises(IndexError):
        corpus.val_batch(n, B, T)


def test_batches_are_the_same_sequences_at_any_microbatch_size(corpus):
    """A mini-batch of 32 sequences is the same tensor cut into 2 micro-batches of 16 or 16 of 2,
    for training and for validation."""
    for seed in (0, 3):
        whole = torch.cat([corpus.batch(seed, mb, 16, 32)[0] for mb in range(2)])
        assert torch.equal(whole, torch.cat([corpus.batch(seed, mb, 2, 32)[0] for mb in range(16)]))
    val = torch.cat([corpus.val_batch(i, 16, 32)[1] for i in range(2)])
    assert torch.equal(val, torch.cat([corpus.val_batch(i, 2, 32)[1] for i in range(16)]))


def test_corpus_split_is_by_whole_document(corpus):
    """Every 10th work (by title) is validation, about 10% of the text, sharing no line with train."""
    docs = data.corpus_documents()
    assert len(docs) == 42
    val_titles = [title for i, (title, _) in enumerate(docs) if i % 10 == 9]
    assert corpus.val_documents == tuple(val_titles)
    train_docs, val_docs = data.split_documents(docs)
    assert {t for t, _ in train_docs}.isdisjoint({t for t, _ in val_docs})
    assert len(train_docs) + len(val_docs) == 42
    val_chars = sum(len(text) for _, text in val_docs)
    assert 0.07 < val_chars / sum(len(text) for _, text in docs) < 0.13
    train_lines = {line for _, text in train_docs for line in text.splitlines()}
    assert not {line for _, text in val_docs for line in text.splitlines() if len(line) > 60} & train_lines
    # the token streams are exactly the documents, joined by the end-of-text token
    assert corpus.decode(corpus.val) == EOT.join(text for _, text in val_docs)
    assert corpus.decode(corpus.train) == EOT.join(text for _, text in train_docs)


def test_tokenizer_round_trip(corpus):
    """decode(encode(s)) == s for corpus, odd-whitespace and non-ASCII text."""
    samples = ["To be, or not to be: that is the question.", "  two  spaces\n\n\tand a tab \n",
               "caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f3ad", "", "\n",
               data.corpus_documents()[6][1][:5000]]
    assert corpus.vocab_size == 4096 and corpus.tokenizer.get_vocab_size() == 4096
    for text in samples:
        assert corpus.decode(corpus.encode(text)) == text
    assert corpus.encode(EOT) == [0]


def test_pieces_encode_like_the_whole_text(corpus):
    """Encoding a long text in pieces (for speed) gives exactly the tokens of encoding it whole."""
    _, text = data.corpus_documents()[6]
    pieces = list(data._pieces(text, size=2000))
    assert len(pieces) > 50 and "".join(pieces) == text
    assert data._encode(corpus.tokenizer, [text]).tolist() == corpus.tokenizer.encode(text).ids


def test_cache_reused_without_retraining(tmp_path, monkeypatch):
    """A second load reads the cache: no training, files untouched, same tokens."""
    _write_texts(tmp_path / "txt", 3)
    first = load_data(tmp_path / "txt", vocab_size=300)
    entry = Path(first.train.filename).parent
    assert entry.parent == tmp_path / "cache"
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    def no_training(*args):
        raise AssertionError("the tokenizer was retrained")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_train_tokenizer", no_training)
        second = load_data(tmp_path / "txt", vocab_size=300)
    assert second.cached and not first.cached
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert load_data(tmp_path / "txt", vocab_size=320).cached is False  # vocab size is in the key


def test_cache_untouched_when_build_fails(tmp_path, monkeypatch):
    """An interrupt just before the cache entry is committed leaves no entry and no temporary files."""
    _write_texts(tmp_path / "txt", 3)

    def interrupted(src, dst):
        assert {p.name for p in Path(src).iterdir()} == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(data.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_data(tmp_path / "txt", vocab_size=300)
    assert _leftovers(tmp_path / "cache") == []
    assert load_data(tmp_path / "txt", vocab_size=300).cached is False


def test_bin_folder_is_memmapped(tmp_path):
    """train.bin/val.bin are memmapped as uint16; vocab is 1 + max id (cached) or meta.json's."""
    rng = np.random.default_rng(0)
    rng.integers(0, 500, size=5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    val = rng.integers(0, 500, size=1000, dtype=np.uint16)
    val[17] = 777
    val.tofile(tmp_path / "val.bin")
    loaded = load_data(tmp_path)
    assert isinstance(loaded.train, np.memmap) and isinstance(loaded.val, np.memmap)
    assert (loaded.train_tokens, loaded.val_tokens, loaded.vocab_size) == (5000, 1000, 778)
    assert loaded.tokenizer is None and loaded.decode([1, 2]) == "1 2"
    assert len(list((tmp_path / "cache").glob("bin-vocab-*.json"))) == 1
    x, y = loaded.batch(0, 0, 2, 16)
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 778
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 1024}))
    assert load_data(tmp_path).vocab_size == 1024


def test_text_folder_with_tiny_vocab(tmp_path):
    """A few small files train a small tokenizer; the last ~10% of lines become validation."""
    paths = _write_texts(tmp_path / "txt", 3)
    loaded = load_data(tmp_path / "txt", vocab_size=300)
    assert 257 < loaded.vocab_size <= 300
    assert loaded.val_documents == ("doc02.txt (last lines)",)
    full = EOT.join(p.read_text() for p in paths)
    train_text, val_text = loaded.decode(loaded.train), loaded.decode(loaded.val)
    assert train_text + val_text == full and train_text.endswith("\n")
    assert 0.08 < len(val_text) / len(full) < 0.12
    loaded.check_fits(4, 64)
    assert loaded.batch(0, 0, 4, 64)[0].shape == (4, 64)


def test_single_text_file_splits_at_a_line_boundary(tmp_path):
    """One file: train is its head up to a line break near 90%, validation the remaining lines."""
    (path,) = _write_texts(tmp_path, 1, lines=400)
    loaded = load_data(path, vocab_size=300)
    train_text, val_text = loaded.decode(loaded.train), loaded.decode(loaded.val)
    assert train_text + val_text == path.read_text() and train_text.endswith("\n")
    assert loaded.val_documents == ("doc00.txt (last lines)",)


def test_text_folder_holds_out_every_tenth_file(tmp_path):
    """With 10 or more files, the 10th, 20th, ... (sorted by path, recursively) are validation."""
    _write_texts(tmp_path / "txt", 9, lines=40)
    _write_texts(tmp_path / "txt" / "sub", 3, lines=40, seed=1)
    (tmp_path / "txt" / "empty.txt").write_text("")
    (tmp_path / "txt" / "notes.md").write_text("not a .txt file")
    loaded = load_data(tmp_path / "txt", vocab_size=300)
    assert loaded.val_documents == ("sub/doc00.txt",)  # 10th of doc00..doc08, sub/doc00..02


def _single_line(tmp_path):
    (tmp_path / "one.txt").write_text("a single line without any break " * 20)
    return tmp_path / "one.txt"


def _only_train_bin(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    return tmp_path


def _odd_bin(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").write_bytes(b"\x01\x02\x03")
    return tmp_path


def _no_text(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    return tmp_path


def _empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return tmp_path / "empty.txt"


def _binary_txt(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\xff\xfe\x00garbage")
    return tmp_path


@pytest.mark.parametrize("make_path, vocab_size, message", [
    (lambda p: p / "missing", 4096, "does not exist"),
    (_empty_file, 4096, "only empty text"),
    (lambda p: p, 4096, "no usable data"),
    (_no_text, 4096, "add \\*.txt files"),
    (_binary_txt, 4096, "not UTF-8"),
    (_single_line, 300, "too small to hold out validation"),
    (_only_train_bin, 4096, "has train.bin but no val.bin"),
    (_odd_bin, 4096, "not a non-empty array of uint16"),
    (None, 256, "vocab_size=256 is out of range"),
    (None, 65536, "vocab_size=65536 is out of range"),
])
def test_load_data_rejects_bad_input(tmp_path, make_path, vocab_size, message):
    """Each unusable input raises DataError naming the problem, and leaves nothing in the cache."""
    (tmp_path / "in").mkdir()
    path = make_path(tmp_path / "in") if make_path else None
    with pytest.raises(DataError, match=message) as err:
        load_data(path, vocab_size=vocab_size)
    assert ":" in str(err.value) and "\n" not in str(err.value)
    assert _leftovers(tmp_path / "cache") == []


def test_check_fits_rejects_too_small_splits(tmp_path):
    """check_fits raises DataError when a split holds less than one batch of distinct windows."""
    train = np.arange(1000, dtype=np.uint16)
    small = TokenData(train, train[:100], 1000, source="toy")
    small.check_fits(3, 33)  # 3 * 33 + 1 = 100 tokens: just fits
    with pytest.raises(DataError, match="validation split of toy has 100 tokens.*smaller batch_size"):
        small.check_fits(2, 50)
    with pytest.raises(DataError, match="train split of toy has 1,000 tokens"):
        small.check_fits(1, 1000)
    with pytest.raises(DataError, match="train split"):
        small.batch(0, 0, 1, 1000)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        small.batch(0, 0, 1, 0)
