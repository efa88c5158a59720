"""Tests for prepare_data.py: CPU only, tiny corpora in tmp_path, a few seconds in all.

Run: python -m pytest -q test_prepare_data.py

The GPT-2 tests build the tokenizer offline from a local copy of the GPT-2 ranks (a .tiktoken file,
never committed): $NITP_GPT2_TIKTOKEN if set, else ../shared/tokenizers/gpt2.tiktoken. They are
skipped, saying how to point them at the file, when it is absent; everything else needs no file
and no network.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prepare_data as pd
from prepare_data import PrepareConfig, PrepareError, prepare

REPO = Path(__file__).resolve().parent
GPT2_FILE = Path(os.environ.get("NITP_GPT2_TIKTOKEN", REPO.parent / "shared/tokenizers/gpt2.tiktoken"))
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.is_file(), reason=f"no GPT-2 ranks at {GPT2_FILE}; set "
                                "NITP_GPT2_TIKTOKEN=/path/to/gpt2.tiktoken to run the GPT-2 tests")


def write_docs(folder: Path, texts, suffix=".txt") -> list[Path]:
    """One file per text, named so that sorting keeps the given order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc{i:05d}{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        paths.append(path)
    return paths


def split_documents(folder: Path, split: str, tokenizer) -> list[str]:
    """Decode a split back into its documents (the eot id comes before each one)."""
    meta = pd.read_meta(folder)
    ids = np.asarray(pd.load_split(folder, split), dtype=np.int64)
    assert ids.size == 0 or ids[0] == meta["eot_token"]
    starts = np.flatnonzero(ids == meta["eot_token"])
    return [tokenizer.decode(part[1:]) for part in np.split(ids, starts)[1:]]


def config(tmp_path, inputs, **options) -> PrepareConfig:
    options.setdefault("num_proc", 1)
    options.setdefault("name", "ds")
    return PrepareConfig(inputs=tuple(str(i) for i in inputs), out_dir=str(tmp_path / "data"), **options)


TEXTS = ["Hello world.\n", "Ünïcödé — 日本語 😀\nsecond line\n", "def f(x):\n    return x + 1\n",
         "<|endoftext|> is plain text inside a document\n", "   leading spaces and trailing   \n\n"]


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_and_ids():
    tok = pd.get_tokenizer("byte")
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert (tok.vocab_size, tok.eot_token) == (257, 256)
    assert tok.decode(tok.encode(TEXTS[1]) + [256] + tok.encode("x")) == TEXTS[1] + "<|endoftext|>x"


@needs_gpt2
def test_gpt2_from_file_matches_known_ids():
    tok = pd.get_tokenizer("gpt2", tiktoken_file=str(GPT2_FILE))
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_token, tok.name) == (50257, 50256, "gpt2")
    assert 50256 not in tok.encode("<|endoftext|>")  # ordinary encoding: specials are plain text


@needs_gpt2
def test_wrong_rank_file_for_tokenizer_is_refused():
    with pytest.raises(PrepareError, match="not the cl100k_base rank file"):
        pd.get_tokenizer("cl100k_base", tiktoken_file=str(GPT2_FILE))


def test_offline_tiktoken_gives_one_clear_error(monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(PrepareError, match="could not be fetched.*--tiktoken_file=PATH.*--tokenizer=byte"):
        pd.get_tokenizer("gpt2")


def test_token_dtype_widens_past_65536():
    assert [pd.token_dtype(v) for v in (257, 50257, 65536, 65537, 100277, 200019)] == \
           ["uint16", "uint16", "uint16", "uint32", "uint32", "uint32"]


def test_big_vocab_tokens_are_written_as_uint32(monkeypatch):
    class BigVocab(pd.ByteTokenizer):
        vocab_size, eot_token = 100277, 100257

        def encode_array(self, text):
            return np.array([70000 + len(text)], dtype=np.uint32)  # an id that uint16 would corrupt

    monkeypatch.setattr(pd, "_worker_tokenizer", BigVocab())
    result = pd.process_chunk([pd.Record("text", pd.WHOLE, b"abc", "x")])
    assert result.tokens.dtype == np.dtype("<u4")
    assert result.tokens.tolist() == [100257, 70003]


# ----------------------------------------------------------------------------- round trips and the split

def test_byte_round_trip_every_document_once(tmp_path):
    write_docs(tmp_path / "in", TEXTS)
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))
    folder = tmp_path / "data/ds"
    tok = pd.get_tokenizer("byte")
    train, val = split_documents(folder, "train", tok), split_documents(folder, "val", tok)
    assert sorted(train + val) == sorted(TEXTS)
    assert (len(train), len(val)) == (3, 2) == (meta["train_documents"], meta["val_documents"])
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(t.encode()) + 1 for t in TEXTS)


@needs_gpt2
def test_gpt2_round_trip_and_ids_on_disk(tmp_path):
    write_docs(tmp_path / "in", TEXTS)
    meta = prepare(config(tmp_path, [tmp_path / "in"], tokenizer="gpt2", tiktoken_file=str(GPT2_FILE),
                          val_docs=1))
    tok = pd.get_tokenizer("gpt2", tiktoken_file=str(GPT2_FILE))
    folder = tmp_path / "data/ds"
    docs = split_documents(folder, "train", tok) + split_documents(folder, "val", tok)
    assert sorted(docs) == sorted(TEXTS)
    assert (meta["dtype"], meta["vocab_size"], meta["eot_token"]) == ("uint16", 50257, 50256)
    first = np.asarray(pd.load_split(folder, "train"))[:3].tolist()
    assert first == [50256, 15496, 995]  # "Hello world." starts the first train document


def test_split_is_by_document_no_document_on_both_sides(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_BYTES", 2000)  # many chunks, so documents cross chunk borders
    texts = [f"marker-{i:04d} " + "lorem ipsum " * (i % 40) + f"end-{i:04d}\n" for i in range(400)]
    write_docs(tmp_path / "in", texts)
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_fraction=0.2))
    folder = tmp_path / "data/ds"
    splits = {s: bytes(np.asarray(pd.load_split(folder, s), dtype=np.uint8)) for s in ("train", "val")}
    for i in range(400):
        marker = f"marker-{i:04d}".encode()
        in_train, in_val = splits["train"].count(marker), splits["val"].count(marker)
        assert in_train + in_val == 1
        assert (in_train, in_val) == (splits["train"].count(f"end-{i:04d}".encode()),
                                      splits["val"].count(f"end-{i:04d}".encode()))
    assert 40 <= meta["val_documents"] <= 120  # ~80 expected from a uniform hash
    assert meta["train_documents"] + meta["val_documents"] == 400


def test_val_docs_gives_exactly_n(tmp_path):
    write_docs(tmp_path / "in", [f"document {i}\n" for i in range(50)])
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=7))
    assert (meta["val_documents"], meta["train_documents"]) == (7, 43)


def test_empty_val_split_is_an_error(tmp_path):
    write_docs(tmp_path / "in", ["one\n", "two\n"])
    with pytest.raises(PrepareError, match="val split is empty.*--val_docs"):
        prepare(config(tmp_path, [tmp_path / "in"], val_fraction=1e-9))
    assert not (tmp_path / "data/ds").exists() and not (tmp_path / "data/.ds.partial").exists()


def test_same_inputs_give_identical_files_for_any_num_proc(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_BYTES", 3000)
    write_docs(tmp_path / "in", [f"doc {i} " + "word " * (i * 7 % 300) + "\n" for i in range(300)])
    for out, procs in (("a", 1), ("b", 2), ("c", 2)):
        prepare(PrepareConfig(inputs=(str(tmp_path / "in"),), name="ds", out_dir=str(tmp_path / out),
                              num_proc=procs, val_fraction=0.1))
    for name in ("train.bin", "val.bin", "meta.json"):
        reference = (tmp_path / "a/ds" / name).read_bytes()
        assert (tmp_path / "b/ds" / name).read_bytes() == reference
        assert (tmp_path / "c/ds" / name).read_bytes() == reference


@needs_gpt2
def test_gpt2_parallel_equals_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_BYTES", 3000)
    write_docs(tmp_path / "in", [f"Paragraph {i}: the quick brown fox, {i * 37} times.\n" * (i % 20 + 1)
                                 for i in range(200)])
    for out, procs in (("a", 1), ("b", 2)):
        prepare(PrepareConfig(inputs=(str(tmp_path / "in"),), name="ds", out_dir=str(tmp_path / out),
                              num_proc=procs, tokenizer="gpt2", tiktoken_file=str(GPT2_FILE)))
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a/ds" / name).read_bytes() == (tmp_path / "b/ds" / name).read_bytes()


# ----------------------------------------------------------------------------- robustness

def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    raw = b"abc\xff\xfedef \xe6\x97\xa5 cut\xe6\x97\n"  # two stray bytes, then a truncated 3-byte char
    write_docs(tmp_path / "in", [raw, "fine\n"])
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=1))
    assert meta["replaced_invalid_bytes"] == 4
    docs = split_documents(tmp_path / "data/ds", "train", pd.ByteTokenizer()) + \
        split_documents(tmp_path / "data/ds", "val", pd.ByteTokenizer())
    assert sorted(docs) == sorted([raw.decode("utf-8", errors="replace"), "fine\n"])


def test_empty_documents_are_skipped_and_counted(tmp_path):
    write_docs(tmp_path / "in", ["", "  \n\t\n", "real one\n", "real two\n"])
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=1))
    assert meta["empty_documents_skipped"] == 2
    assert meta["train_documents"] + meta["val_documents"] == 2


def test_unreadable_file_is_skipped_and_counted(tmp_path, capsys):
    write_docs(tmp_path / "in", ["good one\n", "good two\n"])
    (tmp_path / "in/broken.txt.gz").write_bytes(b"this is not gzip data")
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=1))
    assert meta["unreadable_files_skipped"] == 1
    assert meta["train_documents"] + meta["val_documents"] == 2
    assert "broken.txt.gz" in capsys.readouterr().err


def test_empty_corpus_is_an_error(tmp_path):
    write_docs(tmp_path / "in", ["", "\n\n"])
    with pytest.raises(PrepareError, match="empty corpus"):
        prepare(config(tmp_path, [tmp_path / "in"]))
    with pytest.raises(PrepareError, match="empty corpus"):
        prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))


def test_jsonl_gz_and_txt_gz_inputs(tmp_path, capsys):
    lines = [json.dumps({"content": f"record {i} \u00e9"}) for i in range(6)]
    lines[2] = "{not json"
    lines[3] = json.dumps({"content": None})  # missing text counts as an empty document
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:3]) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[3:]) + "\n")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("gzipped text document\n")
    meta = prepare(config(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.txt.gz"],
                          text_field="content", val_docs=1))
    docs = split_documents(tmp_path / "data/ds", "train", pd.ByteTokenizer()) + \
        split_documents(tmp_path / "data/ds", "val", pd.ByteTokenizer())
    expected = [f"record {i} \u00e9" for i in (0, 1, 4, 5)] + ["gzipped text document\n"]
    assert sorted(docs) == sorted(expected)
    assert (meta["bad_json_lines_skipped"], meta["empty_documents_skipped"]) == (1, 1)
    assert "a.jsonl:3" in capsys.readouterr().err


def test_jsonl_missing_field_names_the_fix(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PrepareError, match=r"a.jsonl:1: no field 'text' \(found: body\).*--text_field"):
        prepare(config(tmp_path, [tmp_path / "a.jsonl"]))


def test_lone_surrogates_in_json_are_replaced(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "bad \\ud800 char"}\n{"text": "ok \\ud83d\\ude00"}\n')
    meta = prepare(config(tmp_path, [tmp_path / "a.jsonl"], val_docs=1))
    assert meta["replaced_invalid_bytes"] == 1
    docs = split_documents(tmp_path / "data/ds", "train", pd.ByteTokenizer()) + \
        split_documents(tmp_path / "data/ds", "val", pd.ByteTokenizer())
    assert sorted(docs) == sorted(["bad \ufffd char", "ok \U0001F600"])


def test_folder_and_glob_inputs(tmp_path):
    write_docs(tmp_path / "corpus/sub", ["nested\n"])
    write_docs(tmp_path / "corpus", ["top\n"])
    (tmp_path / "corpus/notes.csv").write_text("skipped,unsupported\n")
    write_docs(tmp_path / "corpus/.hidden", ["hidden\n"])
    write_docs(tmp_path / "more", ["globbed one\n", "globbed two\n"])
    files = pd.resolve_inputs([str(tmp_path / "corpus"), str(tmp_path / "more/*.txt"),
                               str(tmp_path / "corpus/doc00000.txt")])  # the last is a duplicate
    rel = [f.path.relative_to(tmp_path).as_posix() for f in files]
    assert rel == ["corpus/doc00000.txt", "corpus/sub/doc00000.txt", "more/doc00000.txt", "more/doc00001.txt"]
    meta = prepare(config(tmp_path, [tmp_path / "corpus", tmp_path / "more/*.txt"], val_docs=1))
    assert meta["train_documents"] + meta["val_documents"] == 4


def test_no_matching_input_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match="matched no"):
        pd.resolve_inputs([str(tmp_path / "nothing*.txt")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PrepareError, match="unsupported file type"):
        pd.resolve_inputs([str(tmp_path / "x.csv")])


def test_txt_split_rules(tmp_path):
    (tmp_path / "a.txt").write_text("one\nstill one\n\n\n two\n\nthree\n<|endoftext|>\nfour\n")
    by_blank = prepare(config(tmp_path, [tmp_path / "a.txt"], txt_split="blank_lines", val_docs=1, name="b"))
    by_sep = prepare(config(tmp_path, [tmp_path / "a.txt"], txt_split="separator", val_docs=1, name="s"))
    assert by_blank["train_documents"] + by_blank["val_documents"] == 3
    assert by_sep["train_documents"] + by_sep["val_documents"] == 2
    tok = pd.ByteTokenizer()
    docs = split_documents(tmp_path / "data/s", "train", tok) + split_documents(tmp_path / "data/s", "val", tok)
    assert sorted(docs) == sorted(["one\nstill one\n\n\n two\n\nthree\n", "four\n"])


@pytest.mark.parametrize("tokenizer", ["byte", pytest.param("gpt2", marks=needs_gpt2)])
def test_long_document_in_pieces_tokenises_like_a_whole(tmp_path, monkeypatch, tokenizer):
    # PIECE_BYTES=1: the document is cut at every boundary the safe-cut rule allows; every ordered pair of
    # these lines meets somewhere, and several pairs (a line before a blank one, "\r\n", trailing or
    # non-breaking spaces) would tokenise differently if cut. The ids must equal the one-shot encoding.
    monkeypatch.setattr(pd, "PIECE_BYTES", 1)
    lines = ["Intro line.\n", "    indented(code)\n", "\n", "Trailing space \n", "CRLF line\r\n", "42 is\n",
             "x.\n", "/slash start\n", "\u00e9t\u00e9 \u65e5\u672c\n", "'s quote\n", "Zed\n", "  \n",
             "\t\tTabbed\n", " lead\n", "end  \n", "!!\n", "\u00a0nbsp\n", "word\u00a0\n"]
    text = "".join(a + b for a in lines for b in lines)
    (tmp_path / "long.txt").write_text(text, newline="")
    (tmp_path / "short.txt").write_text("the other document\n")
    tiktoken_file = str(GPT2_FILE) if tokenizer == "gpt2" else None
    prepare(config(tmp_path, [tmp_path / "long.txt", tmp_path / "short.txt"], tokenizer=tokenizer,
                   tiktoken_file=tiktoken_file, val_docs=1))
    tok = pd.get_tokenizer(tokenizer, tiktoken_file)
    folder = tmp_path / "data/ds"
    ids = np.concatenate([pd.load_split(folder, "train"), pd.load_split(folder, "val")]).tolist()
    expected = [tok.eot_token] + tok.encode(text)
    assert expected == ids[:len(expected)] or expected == ids[-len(expected):]


def test_hard_cuts_never_split_a_utf8_character(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "PIECE_BYTES", 100)
    monkeypatch.setattr(pd, "HARD_PIECE_BYTES", 150)
    monkeypatch.setattr(pd, "READLINE_LIMIT", 7)  # lines arrive in 7-byte parts: cuts land mid-character
    text = "\u65e5\u672c\u8a9e\U0001F600\u00e9" * 400 + "\n"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("other\n")
    meta = prepare(config(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], val_docs=1))
    assert meta["replaced_invalid_bytes"] == 0
    tok = pd.ByteTokenizer()
    docs = split_documents(tmp_path / "data/ds", "train", tok) + split_documents(tmp_path / "data/ds", "val", tok)
    assert sorted(docs) == sorted([text, "other\n"])


def test_max_bytes_stops_at_a_document_boundary(tmp_path):
    write_docs(tmp_path / "in", ["x" * 99 + "\n"] * 10)
    meta = prepare(config(tmp_path, [tmp_path / "in"], max_bytes=250, val_docs=1))
    assert meta["train_documents"] + meta["val_documents"] == 3  # 100 + 100 + 100 crosses 250
    assert meta["input_bytes"] == 300


def test_stdlib_files_are_sorted_and_leave_tests_out():
    files = pd.stdlib_files()
    root = Path(pd.sysconfig.get_paths()["stdlib"])
    rel = [f.path.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any(part in pd.STDLIB_SKIP_DIRS for r in rel for part in r.split("/")[:-1])


def test_shakespeare_uses_the_cache_and_splits_speeches(tmp_path):
    cache = tmp_path / "data/downloads/tinyshakespeare.txt"
    cache.parent.mkdir(parents=True)
    cache.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\n" * 50)
    meta = prepare(PrepareConfig(source="shakespeare", out_dir=str(tmp_path / "data"), num_proc=1))
    assert meta["train_documents"] + meta["val_documents"] == 100
    assert (tmp_path / "data/shakespeare/meta.json").is_file()


def test_shakespeare_offline_error_points_at_input(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens there
    with pytest.raises(PrepareError, match="could not download Tiny Shakespeare.*--input"):
        pd.fetch_shakespeare(tmp_path / "data")


def test_missing_optional_packages_name_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "zstandard", None)
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(PrepareError, match="pip install pyarrow"):
        prepare(config(tmp_path, [tmp_path / "a.parquet"]))
    with pytest.raises(PrepareError, match="pip install zstandard"):
        prepare(config(tmp_path, [tmp_path / "b.jsonl.zst"]))


def test_parquet_and_zst_inputs(tmp_path):
    import pyarrow as pa  # both are in requirements-test.txt
    import pyarrow.parquet as pq
    import zstandard
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst one"}\n'))
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "d.txt.zst").write_bytes(b"not zstd at all")
    inputs = [tmp_path / name for name in ("a.parquet", "b.jsonl.zst", "c.parquet", "d.txt.zst")]
    meta = prepare(config(tmp_path, inputs, val_docs=1))
    tok = pd.ByteTokenizer()
    docs = split_documents(tmp_path / "data/ds", "train", tok) + split_documents(tmp_path / "data/ds", "val", tok)
    assert sorted(docs) == ["pq one", "pq two", "zst one"]
    assert (meta["empty_documents_skipped"], meta["unreadable_files_skipped"]) == (1, 2)


# ----------------------------------------------------------------------------- output folder safety

def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_BYTES", 500)
    write_docs(tmp_path / "in", [f"document {i} " * 30 + "\n" for i in range(50)])
    calls = []

    def add_then_fail(self, result):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-way
        original_add(self, result)

    original_add = pd.SplitWriter.add
    monkeypatch.setattr(pd.SplitWriter, "add", add_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))
    assert not (tmp_path / "data/ds").exists()
    assert not (tmp_path / "data/.ds.partial").exists()
    with pytest.raises(FileNotFoundError, match="python prepare_data.py --input=YOUR_FILES --name=ds"):
        pd.read_meta(tmp_path / "data/ds")


def test_interrupted_rebuild_keeps_the_old_dataset(tmp_path, monkeypatch):
    write_docs(tmp_path / "in", [f"document {i}\n" for i in range(20)])
    prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))
    before = (tmp_path / "data/ds/train.bin").read_bytes()

    def fail(self, result):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.SplitWriter, "add", fail)
    with pytest.raises(RuntimeError):
        prepare(config(tmp_path, [tmp_path / "in"], val_docs=2, seed=7, overwrite=True))
    assert (tmp_path / "data/ds/train.bin").read_bytes() == before
    assert pd.read_meta(tmp_path / "data/ds")["recipe"]["seed"] == 1337


def test_killed_process_leaves_no_meta_json(tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text(("a line of text for the byte tokenizer\n" * 200 + "\n") * 4000)  # ~30 MB
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), f"--input={corpus}",
                             "--txt_split=blank_lines", f"--out_dir={tmp_path / 'data'}", "--num_proc=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_train = tmp_path / "data/.big.partial/train.bin"
    deadline = time.time() + 20
    while time.time() < deadline and proc.poll() is None:
        if partial_train.is_file() and partial_train.stat().st_size > 0:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "prepare finished before it could be killed: make the corpus bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "data/big").exists()
    assert not (tmp_path / "data/.big.partial/meta.json").exists()
    with pytest.raises(FileNotFoundError):
        pd.read_meta(tmp_path / "data/.big.partial")


def test_refuses_to_overwrite_a_different_dataset(tmp_path):
    write_docs(tmp_path / "in", [f"document {i}\n" for i in range(20)])
    prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))
    prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))  # same recipe: rebuilt in place
    with pytest.raises(PrepareError, match="already holds a different dataset.*--overwrite"):
        prepare(config(tmp_path, [tmp_path / "in"], val_docs=2, seed=1))
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=2, seed=1, overwrite=True))
    assert pd.read_meta(tmp_path / "data/ds") == meta
    foreign = tmp_path / "data/foreign"
    foreign.mkdir()
    (foreign / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(PrepareError, match="not written by prepare_data.py"):
        prepare(config(tmp_path, [tmp_path / "in"], val_docs=2, name="foreign"))


def test_read_meta_checks_file_sizes(tmp_path):
    write_docs(tmp_path / "in", [f"document {i}\n" for i in range(20)])
    prepare(config(tmp_path, [tmp_path / "in"], val_docs=2))
    with open(tmp_path / "data/ds/train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="does not hold the"):
        pd.read_meta(tmp_path / "data/ds")


# ----------------------------------------------------------------------------- llm.c shards

def test_llmc_shard_round_trip_and_validation(tmp_path):
    tokens = np.arange(0, 65536, 7, dtype=np.uint16)
    path = tmp_path / "shard.bin"
    pd.write_llmc_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, tokens.size]
    back = pd.read_llmc_shard(path)
    assert isinstance(back, np.memmap) and np.array_equal(back, tokens)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x01" * 1024 + tokens.tobytes())
    with pytest.raises(ValueError, match="bad.bin: magic number"):
        pd.read_llmc_shard(bad)
    short = tmp_path / "short.bin"
    short.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="short.bin: header promises"):
        pd.read_llmc_shard(short)
    with pytest.raises(ValueError, match="0..65535"):
        pd.write_llmc_shard(tmp_path / "big.bin", np.array([70000]))


def test_llmc_option_writes_shards_equal_to_splits(tmp_path):
    write_docs(tmp_path / "in", [f"document {i}\n" for i in range(20)])
    meta = prepare(config(tmp_path, [tmp_path / "in"], val_docs=2, llmc=True))
    folder = tmp_path / "data/ds"
    for split in ("train", "val"):
        (shard,) = meta["llmc_shards"][split]
        assert np.array_equal(pd.read_llmc_shard(folder / shard), pd.load_split(folder, split))


# ----------------------------------------------------------------------------- command line

def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(proc, pattern):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in lines[0], lines[0]


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("hello\n")
    assert_one_line_error(run_cli("--input=nothing/*.txt", cwd=tmp_path), "matched no")
    assert_one_line_error(run_cli("--input=empty.txt", cwd=tmp_path), "empty corpus")
    assert_one_line_error(run_cli("--input=ok.txt", "--tokenizer=gpt2", "--tiktoken_file=missing.tiktoken",
                                  cwd=tmp_path), "cannot read --tiktoken_file")
    assert_one_line_error(run_cli("--input=ok.txt", "--source=stdlib", cwd=tmp_path), "use one of them")
    (tmp_path / "data/ok").mkdir(parents=True)
    (tmp_path / "data/ok/notes").write_text("mine")
    assert_one_line_error(run_cli("--input=ok.txt", "--val_docs=1", cwd=tmp_path), "--overwrite")


def test_cli_builds_a_dataset(tmp_path):
    write_docs(tmp_path / "in", [f"document {i}\n" for i in range(20)])
    proc = run_cli("--input=in", "--val_docs=2", "--num_proc=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "18 train / 2 val documents" in proc.stdout
    assert pd.read_meta(tmp_path / "data/in")["val_documents"] == 2
