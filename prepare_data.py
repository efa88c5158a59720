"""prepare_data.py: turn text into the token files that train.py reads.

    python prepare_data.py --input=input.txt        # one text file -> data/input (val: its last 1% of tokens)
    python prepare_data.py                          # stdlib sources -> data/stdlib (byte tokens, offline)
    python prepare_data.py --source=shakespeare     # Tiny Shakespeare, downloaded once into data/downloads/
    python prepare_data.py --input=corpus/ --name=mine --tokenizer=gpt2 --tiktoken_file=gpt2.tiktoken
    python prepare_data.py --input=corpus/ --name=mine --tokenizer=hf:PATH   # a model's tokenizer.json (tokenizers)
    python prepare_data.py --help                   # every option

Writes <out_dir>/<name>/, read by dataset.py (train.py, the probes): train.bin and val.bin (flat little-endian
ids, uint16, or uint32 when vocab_size > 65536, the end-of-text id BEFORE every document), meta.json (tokenizer,
vocab_size, dtype, eot_token, max_token_id, counts, the recipe) and with --llmc the splits as llm.c shards in llmc/.
All is written into a hidden .<name>.partial/, meta.json last, renamed when complete; a folder of another recipe,
or not made here, is replaced only with --overwrite. Bad input: one line on stderr, exit code 2, nothing written.

Documents: stdlib: a .py file of the standard library (no tests), up to 8 MB; shakespeare: a speech; .txt: a file
(--txt_split=file), a paragraph (blank_lines) or a block between lines holding only <|endoftext|> (separator);
.jsonl: a line's --text_field; .parquet: a row's --text_field column (needs pyarrow); .gz and .zst (needs zstandard)
compress .txt and .jsonl. Folders are walked (hidden files skipped) and globs expanded, sorted. Symlinks leading
out of the folder (or a glob's fixed folder), empty documents, unreadable files and lines that are not JSON are
skipped and counted; each invalid UTF-8 byte becomes U+FFFD, counted. Memory stays bounded: ~1M-character chunks,
at most 4 x --num_proc in flight, long documents in pieces. Split by document: document i (empty ones excluded)
goes to val when splitmix64(seed, i) / 2**64 < --val_fraction, or with --val_docs=N when its hash is one of the N
smallest (a first pass counts). When that leaves a split empty (one text file, a few documents), val is instead the
last --val_fraction of all tokens, as nanoGPT splits one long text ("split": "tokens" in meta.json). Same inputs and
options give byte-identical files, whatever --num_proc.

Importable: token_dtype, write_llmc_shard, prepare(PrepareConfig), main. The tokenizers live in tokenizer.py.
"""

import argparse
import contextlib
import glob
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import sysconfig
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenizer import TOKENIZERS, TokenizerError, get_tokenizer
from tokenizer import need as need_package

FORMAT_VERSION = 2  # 2: meta.json gained max_token_id
SOURCES = ("stdlib", "shakespeare")
TXT_SPLITS = ("file", "blank_lines", "separator")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
STDLIB_MAX_BYTES = 8_000_000  # ~8M byte tokens: enough to train a small model, prepared in seconds
# Tests would dominate (17 MB) and repeat; the others: generated tables, a GUI app, demos, per-machine packages.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
                              "turtledemo", "pydoc_data", "encodings", "ensurepip", "__pycache__"})
CHUNK_CHARS = 1 << 20  # one unit of work for a worker: big enough to hide the IPC, small enough to bound memory
PIECE_CHARS = 1 << 20  # a longer .txt document is tokenised in pieces cut where BPE cannot merge across
HARD_PIECE_CHARS = 16 << 20  # ... and cut anyway past this, so memory stays bounded on pathological input
READLINE_LIMIT = 1 << 20  # a single huge line is read in parts of this many characters
LLMC_SHARD_TOKENS = 100_000_000  # llm.c's fineweb shards hold 1e8 tokens
WHOLE, FIRST, CONT, JSON = 0, 1, 2, 3  # an item of input: a document, its first or a later piece, a .jsonl line
# Input is decoded with errors="surrogateescape": each invalid byte becomes one lone surrogate, which the
# workers count and replace by U+FFFD, as they do the lone surrogates that JSON can spell ("\ud800").
_SURROGATE = re.compile("[\ud800-\udfff]")


class PrepareError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback, exit code 2."""


def warn(message: str) -> None:
    print(f"prepare_data.py: warning: {message}", file=sys.stderr)


def need(module: str, purpose: str):
    """Import a package (tqdm; zstandard, pyarrow for their formats), or a PrepareError saying how to install it."""
    return need_package(module, purpose, PrepareError)


def token_dtype(vocab_size: int) -> str:
    """The narrowest little-endian unsigned type that holds every id below vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_llmc_shard(path, tokens) -> None:
    """Write tokens in llm.c's shard format: 256 int32 header (magic, version, count), then uint16 ids."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size >= 1 << 31 or (tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16)):
        raise ValueError(f"{path}: llm.c shards store a 1-D sequence of < 2**31 ids in 0..65535")
    header = np.array([20240520, 1, tokens.size] + [0] * 253, dtype="<i4")  # llm.c's magic number, version, count
    with open(f"{path}.tmp", "wb") as f:
        f.write(header.tobytes())
        np.asarray(tokens, dtype="<u2").tofile(f)  # (a memmap of uint16 ids is written from the map, not copied)
    os.replace(f"{path}.tmp", path)


# --- configuration
def default_num_proc() -> int:
    # The CPUs this process may use (a container may allow fewer than os.cpu_count() reports).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class PrepareConfig:
    source: str | None = None  # "stdlib" | "shakespeare"; None: "stdlib", or "input" when inputs are given
    inputs: tuple[str, ...] = ()  # files, folders (recursive) and glob patterns, read in the order given
    name: str | None = None  # output folder under out_dir; None: the source name, or the input's stem
    out_dir: str = "data"  # where dataset folders (and downloads/) live
    tokenizer: str = "byte"  # one of TOKENIZERS, or hf:PATH: a tokenizer.json (get_tokenizer checks tiktoken_file)
    tiktoken_file: str | None = None  # local gpt2 .tiktoken rank file, to build the tokenizer offline
    val_fraction: float = 0.01  # expected share of documents in val (by document hash), in (0, 1)
    val_docs: int | None = None  # exactly this many documents in val instead (overrides val_fraction)
    seed: int = 1337  # chooses which documents go to val, in 0..2**64-1
    num_proc: int = field(default_factory=default_num_proc)  # tokenising processes; 1: all in this process
    text_field: str = "text"  # the .jsonl key / .parquet column holding the text
    txt_split: str | None = None  # rule for .txt documents (TXT_SPLITS); None: blank_lines for shakespeare
    llmc: bool = False  # also write llm.c shards (llmc/train_000000.bin, ...) next to train.bin / val.bin
    overwrite: bool = False  # replace an existing folder of that name, whatever it holds

    def __post_init__(self):
        if self.inputs and self.source is not None:
            raise PrepareError(f"--source={self.source} and --input both given: use one of them")
        self.source = "input" if self.inputs else (self.source or "stdlib")
        if self.name is None and len(self.inputs) > 1:
            raise PrepareError(f"{len(self.inputs)} inputs given: name the dataset with --name=NAME")
        if self.name is None and self.inputs:  # the input's stem: corpus.jsonl.gz -> corpus, texts/*.txt -> texts
            self.name = re.sub(r"(?i)(\.(txt|jsonl|parquet|gz|zst))+$", "", real(fixed_prefix(self.inputs[0])).name)
        self.name = self.name or self.source
        self.txt_split = self.txt_split or ("blank_lines" if self.source == "shakespeare" else "file")
        if self.tokenizer.startswith("hf:"):  # absolute: meta.json must name it for sample.py, run from anywhere
            self.tokenizer = f"hf:{os.path.abspath(self.tokenizer[3:])}"
        max_proc = 4 * (os.cpu_count() or 1)
        for ok, problem in [  # nan and inf fail the range comparisons too
            (self.source in SOURCES + ("input",), f"--source={self.source} is not one of {', '.join(SOURCES)}"),
            (self.tokenizer in TOKENIZERS or self.tokenizer.startswith("hf:"),
             f"--tokenizer={self.tokenizer} is not one of {', '.join(TOKENIZERS)} or hf:PATH"),
            (all(self.inputs), "--input needs a file, folder or glob pattern, not an empty string"),
            (re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name) and not self.name.endswith(".partial"),
             f"--name={self.name!r} must be a plain folder name (letters, digits, _ . -)"),
            (0.0 < self.val_fraction < 1.0, f"--val_fraction={self.val_fraction} must be strictly between 0 and 1"),
            (self.val_docs is None or self.val_docs >= 1, f"--val_docs={self.val_docs} must be at least 1"),
            (0 <= self.seed < 1 << 64, f"--seed={self.seed} must be in 0..2**64-1"),
            (1 <= self.num_proc <= max_proc, f"--num_proc={self.num_proc} must be between 1 and {max_proc} (4 x CPUs)"),
            (self.txt_split in TXT_SPLITS, f"--txt_split={self.txt_split} is not one of {', '.join(TXT_SPLITS)}")]:
            if not ok:
                raise PrepareError(problem)


# --- finding the input files
def input_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) read from the file name, or None if the file is not a supported input."""
    m = re.search(r"\.(txt|jsonl|parquet)(?:\.(gz|zst))?$", path.name.lower())
    return None if m is None or (m[1] == "parquet" and m[2]) else (m[1], m[2] or "")


def fixed_prefix(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard (the pattern itself if it has none)."""
    return next(p for p in (Path(pattern), *Path(pattern).parents) if not glob.has_magic(str(p)))


def real(path) -> Path:
    # os.path.realpath, not Path.resolve: a symlink loop must not raise (RuntimeError before Python 3.13).
    return Path(os.path.realpath(path))


def resolve_inputs(patterns) -> tuple[list[Path], int]:
    """(the supported files the patterns name, in order, each folder and glob sorted, without duplicates; the number
    of symlinks skipped as they lead out of the folder or the glob's fixed folder). A glob's ** follows symlinked
    folders; os.walk lists them without entering: one inside the tree is walked anyway, one outside is skipped."""
    files, skipped = {}, 0  # resolved path -> path as given
    for pattern in patterns:
        root, found, candidates = real(fixed_prefix(pattern)), 0, []
        for match in map(Path, sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]):
            if not (match.is_dir() and real(match).is_relative_to(root)):
                candidates.append(match)
                continue
            walked = []
            for dirpath, dirnames, filenames in os.walk(match):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # hidden folders, hidden files:
                walked += [Path(dirpath, n) for n in dirnames + filenames if not n.startswith(".")]  # skipped
            candidates += sorted(walked, key=lambda p: p.relative_to(match).as_posix())
        for path in candidates:
            if not real(path).is_relative_to(root):
                skipped += 1
            elif path.is_file() and input_format(path):
                files.setdefault(real(path), path)
                found += 1
            elif path.is_file() and str(path) == pattern:
                raise PrepareError(f"--input={pattern}: unsupported file type; use .txt, .jsonl, .parquet "
                                   "(or .txt.gz, .jsonl.gz, .txt.zst, .jsonl.zst)")
        if not found:
            raise PrepareError(f"--input={pattern} matched no .txt, .jsonl or .parquet file (.gz/.zst allowed)")
    return list(files.values()), skipped


def stdlib_files(max_bytes: int | None = STDLIB_MAX_BYTES) -> list[Path]:
    """The standard library's .py files (no tests nor generated code), sorted, until their sizes reach max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP_DIRS]  # prune: site-packages is huge
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    if not files:
        raise PrepareError(f"found no .py files under {root}: use --input=... or --source=shakespeare")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    total = np.cumsum([p.stat().st_size for p in files])
    return files[:int(np.searchsorted(total, max_bytes)) + 1] if max_bytes else files


def fetch_shakespeare(out_dir) -> Path:
    """The Tiny Shakespeare text, downloaded once into out_dir/downloads/."""
    import urllib.request  # (here: importing it costs more than the rest of the script's start-up)
    cache = Path(out_dir) / "downloads" / "tinyshakespeare.txt"
    if not cache.is_file():
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                data = response.read()
        except OSError as err:  # urllib's URLError is an OSError
            raise PrepareError(f"could not download Tiny Shakespeare ({getattr(err, 'reason', err)}); save it as "
                               f"{cache} or pass a copy with --input=PATH --txt_split=blank_lines") from None
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.with_suffix(".tmp").write_bytes(data)
        os.replace(cache.with_suffix(".tmp"), cache)
    return cache


# --- reading (parent process)
def read_items(files, config: PrepareConfig, stats: Counter):
    """(kind, text, file, line) for each document, piece of one or .jsonl line, in order; an unreadable file is
    reported, counted and skipped from that point on."""
    for path in files:
        fmt, compression = input_format(path) or ("txt", "")  # the stdlib's .py files are text
        try:
            if fmt == "parquet":
                yield from parquet_items(path, config.text_field)
            else:
                raw = (gzip.open(path) if compression == "gz" else open(path, "rb") if not compression else
                       io.BufferedReader(need("zstandard", f"reading {path.name}").open(path, "rb")))
                with io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
                    if fmt == "jsonl":  # whole lines, parsed by the workers in parallel
                        yield from ((JSON, line, str(path), i) for i, line in enumerate(fh, 1) if line.strip())
                    else:
                        yield from text_items(fh, str(path), config)
            stats["input_files_read"] += 1
        except (OSError, EOFError, zlib.error, ValueError,  # pyarrow's ArrowInvalid is a ValueError
                getattr(sys.modules.get("zstandard"), "ZstdError", OSError)) as err:
            stats["unreadable_files_skipped"] += 1
            warn(f"could not read {path} ({err}); skipped it from that point on")


def parquet_items(path: Path, text_field: str):
    table = need("pyarrow.parquet", f"reading {path.name}").ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise PrepareError(f"{path} has no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}): "
                           "pass --text_field=COLUMN")
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for row, text in enumerate(batch.column(0).to_pylist()):
            if not isinstance(text, (str, type(None))):
                raise PrepareError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield WHOLE, text or "", str(path), row


def text_items(fh, origin: str, config: PrepareConfig):
    """The documents of a text file under config.txt_split, one longer than PIECE_CHARS in pieces."""
    end = {"blank_lines": "", "separator": "<|endoftext|>"}.get(config.txt_split)  # a line that ends a document
    lines, size, started = [], 0, False  # the document being read; started: a piece of it was yielded
    hf = config.tokenizer.startswith("hf:")
    for line in iter(lambda: fh.readline(READLINE_LIMIT), ""):
        if line.strip() == end:
            if lines or started:
                yield (CONT if started else WHOLE), "".join(lines), origin, 0
            lines, size, started = [], 0, False
            continue
        # (safe_cut knows tiktoken's pre-tokenisers; a tokenizer.json's may join across any cut)
        if size >= PIECE_CHARS and (size >= HARD_PIECE_CHARS or not hf and safe_cut(lines[-1], line)):
            yield (CONT if started else FIRST), "".join(lines), origin, 0
            lines, size, started = [], 0, True
        lines.append(line)
        size += len(line)
    if lines or started or config.txt_split == "file":  # an empty file is a document too, counted as empty
        yield (CONT if started else WHOLE), "".join(lines), origin, 0


def safe_cut(previous: str, line: str) -> bool:
    """True where the two sides tokenise apart as together: the gpt2, cl100k and o200k pre-tokenisers never join a
    newline after a visible ASCII character to an ASCII letter or digit that starts the next line."""
    return bool(re.fullmatch(r"[!-~]\n", previous[-2:]) and re.match(r"[A-Za-z0-9]", line))


# --- tokenising (worker processes)
# Set by prepare(), inherited by forked workers (building one costs ~0.4 s); spawned ones build their own.
_tokenizer = None


def init_worker(name: str, tiktoken_file: str | None) -> None:
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: the parent alone stops the run
    _tokenizer = _tokenizer or get_tokenizer(name, tiktoken_file)


def tokenize_chunk(items: list, text_field: str, count_only: bool = False) -> tuple:
    """Parse and tokenise one chunk (in a worker; count_only skips the tokenising) -> tokens: every item's ids, eot
    before each document start; lengths (items,): ids per item, eot included, 0 for an empty document; kinds (items,);
    replaced: invalid bytes and lone surrogates made U+FFFD; bad_json: file:line of each line not JSON, skipped."""
    arrays, lengths, kinds, replaced, bad_json = [], [], [], 0, []
    for kind, text, origin, line in items:
        if kind == JSON:
            kind, where = WHOLE, f"{origin}:{line}"
            try:
                obj = json.loads(text)
            except ValueError:
                bad_json.append(where)
                continue
            if not isinstance(obj, dict) or text_field not in obj:
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise PrepareError(f"{where}: no field {text_field!r} (found: {keys}); pass --text_field=FIELD")
            if not isinstance(obj[text_field], (str, type(None))):
                raise PrepareError(f"{where}: field {text_field!r} holds {type(obj[text_field]).__name__}, not text")
            text = obj[text_field] or ""
        if not text.isascii():  # (a cheap test that skips the search in most documents)
            text, bad = _SURROGATE.subn("\ufffd", text)
            replaced += bad
        if kind == WHOLE and not text.strip():
            lengths.append(0)  # an empty document: skipped, and counted by the parent
        else:
            ids = np.zeros(0, np.uint32) if count_only else _tokenizer.encode_array(text)
            arrays += [np.array([_tokenizer.eot_token], dtype=np.uint32), ids] if kind != CONT else [ids]
            lengths.append(len(ids) + (kind != CONT))
        kinds.append(kind)
    dtype = np.dtype(token_dtype(_tokenizer.vocab_size)).newbyteorder("<")
    tokens = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return tokens, np.array(lengths, dtype=np.int64), np.array(kinds, dtype=np.int8), replaced, bad_json


def tokenized(config: PrepareConfig, files, stats: Counter, count_only: bool):
    """Every chunk of the input, tokenised by config.num_proc processes, in input order. (Pool.imap would
    read the whole input ahead of the workers: at most 4 x num_proc chunks in flight keep memory bounded.)"""
    def work():  # the items in chunks of about CHUNK_CHARS characters
        chunk, chunk_start = [], stats["input_chars"]
        for item in read_items(files, config, stats):
            chunk.append(item)
            stats["input_chars"] += len(item[1])
            if stats["input_chars"] - chunk_start >= CHUNK_CHARS:
                yield chunk
                chunk, chunk_start = [], stats["input_chars"]
        if chunk:
            yield chunk

    if config.num_proc == 1:
        yield from (tokenize_chunk(chunk, config.text_field, count_only) for chunk in work())
        return
    with multiprocessing.Pool(config.num_proc, init_worker, (config.tokenizer, config.tiktoken_file)) as pool:
        pending = deque()
        for chunk in work():
            pending.append(pool.apply_async(tokenize_chunk, (chunk, config.text_field, count_only)))
            if len(pending) >= 4 * config.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- the split
def split_hashes(seed: int, doc_ids) -> np.ndarray:
    """splitmix64 of (seed, document index): uniform, and distinct for distinct indices (a bijection)."""
    def splitmix64(z):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, on purpose
        return splitmix64(np.asarray(doc_ids).astype(np.uint64) + splitmix64(np.array([seed], np.uint64))[0])


def docs_threshold(seed: int, n_docs: int, val_docs: int) -> int:
    """The hash threshold that puts exactly val_docs of n_docs documents in val, in memory O(val_docs)."""
    if val_docs >= n_docs:
        raise PrepareError(f"--val_docs={val_docs} leaves no training document: the corpus has {n_docs} non-empty "
                           "documents; pass a smaller --val_docs, or leave it out to split by --val_fraction (of the "
                           "tokens when there are too few documents)")
    smallest = np.zeros(0, dtype=np.uint64)
    for start in range(0, n_docs, 1 << 20):
        block = split_hashes(seed, np.arange(start, min(start + (1 << 20), n_docs)))
        pool = np.concatenate([smallest, block])  # while it holds at most val_docs + 1 hashes, all are kept
        smallest = pool if pool.size <= val_docs + 1 else np.partition(pool, val_docs)[:val_docs + 1]
    return int(np.sort(smallest)[val_docs])


def write_splits(config: PrepareConfig, files, threshold: int, folder: Path, stats: Counter) -> None:
    """Append each document to train.bin or val.bin in folder, counting tokens, documents and skips in stats."""
    tqdm = need("tqdm", "the progress bar").tqdm
    with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val, \
            tqdm(unit=" tokens", unit_scale=True, disable=None, mininterval=0.5) as bar:  # (shown only on a terminal)
        for tokens, lengths, kinds, replaced, bad_json in tokenized(config, files, stats, count_only=False):
            starts = (kinds != CONT) & (lengths > 0)  # (items,) document starts; a CONT piece continues the last one
            doc_ids = stats["train_documents"] + stats["val_documents"] - 1 + np.cumsum(starts)  # (items,)
            is_val = split_hashes(config.seed, doc_ids) < np.uint64(threshold)
            in_val = np.repeat(is_val, lengths)  # (tokens,)
            train.write(tokens[~in_val].tobytes())
            val.write(tokens[in_val].tobytes())
            if bad_json and not stats["bad_json_lines_skipped"]:
                warn(f"skipped a line that is not valid JSON at {bad_json[0]} (more are only counted)")
            stats.update(train_tokens=int((~in_val).sum()), val_tokens=int(in_val.sum()),
                         train_documents=int((starts & ~is_val).sum()), val_documents=int((starts & is_val).sum()),
                         empty_documents_skipped=int(((kinds == WHOLE) & (lengths == 0)).sum()),
                         bad_json_lines_skipped=len(bad_json), replaced_invalid_bytes=replaced)
            stats["max_token_id"] = max(stats["max_token_id"], int(tokens.max(initial=0)))
            bar.update(len(tokens))
    if not stats["train_documents"] + stats["val_documents"]:
        raise PrepareError(f"empty corpus: no non-empty document in {stats['input_files_read']} files read; check "
                           "--input, --text_field and --txt_split")
    if not (stats["train_documents"] and stats["val_documents"]):  # one long document, or a few: split its tokens
        split_by_tokens(folder, config.val_fraction, stats)


def split_by_tokens(folder: Path, val_fraction: float, stats: Counter) -> None:
    """Make val the last val_fraction of all tokens (nanoGPT's split of one long text) when the split by document
    left one split empty: a single file (--txt_split=file), or too few documents for --val_fraction."""
    if stats["val_tokens"]:  # everything went to val: it becomes the stream that is cut
        os.replace(folder / "val.bin", folder / "train.bin")
    n = stats["train_tokens"] + stats["val_tokens"]  # >= 2: a non-empty document is its eot and >= 1 id
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    dtype = np.dtype(token_dtype(_tokenizer.vocab_size)).newbyteorder("<")
    tokens = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    tokens[n - n_val:].tofile(folder / "val.bin")  # (written from the map, not copied into memory)
    val_starts = int((tokens[n - n_val:] == _tokenizer.eot_token).sum())
    del tokens
    os.truncate(folder / "train.bin", (n - n_val) * dtype.itemsize)
    documents = stats["train_documents"] + stats["val_documents"]
    stats["train_tokens"], stats["val_tokens"] = n - n_val, n_val
    # the documents that start in each part (val's first, cut, one started in train)
    stats["train_documents"], stats["val_documents"] = documents - val_starts, val_starts
    stats["split"] = "tokens"


# --- the dataset folder
def recipe(config: PrepareConfig) -> dict:
    """What determines the dataset's content (not where it goes, nor how fast it is made, nor the path of a
    tiktoken_file, whose content is checked): equal recipes may replace each other's output."""
    inputs = {"stdlib": [sysconfig.get_paths()["stdlib"]], "shakespeare": [SHAKESPEARE_URL]}.get(config.source)
    return {"source": config.source, "inputs": inputs or list(config.inputs), "tokenizer": config.tokenizer,
            "val_fraction": None if config.val_docs else config.val_fraction, "val_docs": config.val_docs,
            "seed": config.seed, "text_field": config.text_field, "txt_split": config.txt_split, "llmc": config.llmc,
            "python": sys.version.split()[0] if config.source == "stdlib" else None}


def prepare(config: PrepareConfig) -> dict:
    """Build out_dir/name from config; return its meta.json content. Raises PrepareError on user errors;
    on any failure it leaves no new file behind (but a Tiny Shakespeare download)."""
    global _tokenizer
    final = Path(config.out_dir) / config.name
    partial_dir, old = (final.with_name(f".{final.name}.{kind}") for kind in ("partial", "old"))
    ancestors = (final.parent, *final.parent.parents)
    created = [p for p in ancestors if not p.exists()]  # the folders this run makes, deepest first
    existing = ancestors[len(created)]  # refused before any work: an --out_dir that cannot be made or written to,
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing.is_dir() else "is a file, not a folder"
        raise PrepareError(f"--out_dir={config.out_dir}: {existing} {problem}; pick another --out_dir")
    # and, unless --overwrite, a folder that holds anything but this recipe's dataset (rebuilt: the inputs may have
    # changed). Recipes compare on the keys both have: an older prepare_data.py wrote others.
    if final.exists() and not config.overwrite and not (final.is_dir() and not any(final.iterdir())):
        try:
            old_recipe = json.loads((final / "meta.json").read_text())["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            raise PrepareError(f"{final} exists and was not written by prepare_data.py (no meta.json); "
                               "pass --overwrite to replace it or choose another --name") from None
        if any(old_recipe.get(key) != value for key, value in recipe(config).items() if key in old_recipe):
            raise PrepareError(f"{final} already holds a different dataset ({old_recipe.get('tokenizer')} tokens of "
                               f"{old_recipe.get('source')}); pass --overwrite to replace it or choose another --name")
    try:
        _tokenizer = tokenizer = get_tokenizer(config.tokenizer, config.tiktoken_file)
        if config.llmc and token_dtype(tokenizer.vocab_size) != "uint16":  # (refused before the work, not after)
            raise PrepareError(f"--llmc needs ids below 65536; {tokenizer.name} has {tokenizer.vocab_size}: use gpt2")
        files, symlinks_skipped = resolve_inputs(config.inputs) if config.inputs else ([], 0)  # or a named source's:
        files = files or (stdlib_files() if config.source == "stdlib" else [fetch_shakespeare(config.out_dir)])
        if symlinks_skipped:
            warn(f"skipped {symlinks_skipped} symlinks whose target is outside the input folder")
        threshold = min(int(config.val_fraction * 2.0 ** 64), 2 ** 64 - 1)
        if config.val_docs is not None:  # an extra pass counts the documents
            n_docs = sum(int(((kinds != CONT) & (lengths > 0)).sum())
                         for _, lengths, kinds, _, _ in tokenized(config, files, Counter(), count_only=True))
            threshold = docs_threshold(config.seed, n_docs, config.val_docs)
        for stale in (partial_dir, old):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        partial_dir.mkdir(parents=True)
        stats = Counter(input_files_read=0, unreadable_files_skipped=0, symlinks_skipped=symlinks_skipped)
        write_splits(config, files, threshold, partial_dir, stats)
        meta = {"format_version": FORMAT_VERSION, "name": config.name, "tokenizer": tokenizer.name,
                "split": stats.pop("split", "documents"),
                "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token,
                "eot_source": tokenizer.eot_source,
                "dtype": token_dtype(tokenizer.vocab_size), **stats, "recipe": recipe(config)}
        if config.llmc:  # each split copied into llm.c shards of LLMC_SHARD_TOKENS (uint16) tokens
            (partial_dir / "llmc").mkdir()
            meta["llmc_shards"] = {"train": [], "val": []}
            for split, names in meta["llmc_shards"].items():
                tokens = np.memmap(partial_dir / f"{split}.bin", dtype="<u2", mode="r")
                for start in range(0, len(tokens), LLMC_SHARD_TOKENS):
                    names.append(f"llmc/{split}_{len(names):06d}.bin")
                    write_llmc_shard(partial_dir / names[-1], tokens[start:start + LLMC_SHARD_TOKENS])
        # meta.json last: its presence is what marks a dataset folder as complete.
        (partial_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if final.exists():  # the old folder is removed only once the new is in place
            final.rename(old)
        partial_dir.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # (the first folder that is not empty, or not there, ends the loop)
            for folder in created:  # the folders this run made, while they are empty
                folder.rmdir()
        raise
    return meta


# --- command line
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line (printed by main) instead of argparse's usage block
        raise PrepareError(message)


def main(argv=None) -> int:
    """The command line: an option per PrepareConfig field (--input fills inputs); returns the exit code."""
    start = time.perf_counter()
    p = ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       argument_default=argparse.SUPPRESS, epilog="Output, documents, split: head -24 prepare_data.py")
    p.add_argument("--source", choices=SOURCES, help="named corpus (default: stdlib when no --input)")
    p.add_argument("--input", dest="inputs", nargs="+", action="extend", metavar="PATH",
                   help="files, folders or glob patterns: .txt .jsonl (.gz .zst) .parquet")
    p.add_argument("--name", help="dataset folder name under --out_dir (default: source or input stem)")
    p.add_argument("--out_dir", help="where dataset folders (and downloads/) live (default data)")
    p.add_argument("--tokenizer", help=f"{', '.join(TOKENIZERS)} (default byte), or hf:PATH (a model's tokenizer.json)")
    p.add_argument("--tiktoken_file", help="local gpt2.tiktoken rank file: build gpt2 offline")
    p.add_argument("--val_fraction", type=float, help="share of documents in val (default 0.01)")
    p.add_argument("--val_docs", type=int, help="exactly N documents in val instead")
    p.add_argument("--seed", type=int, help="chooses which documents go to val (default 1337)")
    p.add_argument("--num_proc", type=int, help="tokenising processes (default: the CPUs this process may use)")
    p.add_argument("--text_field", help="jsonl key / parquet column (default text)")
    p.add_argument("--txt_split", choices=TXT_SPLITS, help="documents in .txt (default file; shakespeare: blank_lines)")
    p.add_argument("--llmc", action="store_true", help="also write llm.c shards into <name>/llmc/")
    p.add_argument("--overwrite", action="store_true", help="replace the folder of that name, whatever it holds")
    try:
        config = PrepareConfig(**vars(p.parse_args(argv)))
        m = prepare(config)
    except (PrepareError, TokenizerError) as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder made unwritable meanwhile: not the input's fault
        print(f"prepare_data.py: error: {err}; no dataset was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; no dataset was written", file=sys.stderr)
        return 130
    notes = "".join(f"; {n:,} {k.replace('_', ' ')}" for k, n in m.items() if n and k.endswith(("_skipped", "_bytes")))
    if m["split"] == "tokens":
        notes += f"; too few documents to split by document, so val is the last {config.val_fraction:g} of the tokens"
    print(f"wrote {Path(config.out_dir) / config.name} in {time.perf_counter() - start:.1f} s: "
          f"{m['train_documents']:,} train / {m['val_documents']:,} val documents, {m['train_tokens']:,} train / "
          f"{m['val_tokens']:,} val {m['tokenizer']} tokens ({m['dtype']}){notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
