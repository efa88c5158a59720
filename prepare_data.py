"""prepare_data.py: turn text into the token files that train.py reads.

Run:
    python prepare_data.py                          # stdlib sources -> data/stdlib (byte tokens, offline)
    python prepare_data.py --source=shakespeare     # Tiny Shakespeare, downloaded once into data/downloads/
    python prepare_data.py --input=corpus/ --name=mine --tokenizer=gpt2 --tiktoken_file=gpt2.tiktoken
    python prepare_data.py --help                   # every option

Output, in nanoGPT's layout, under --out_dir (default data/):
    <name>/train.bin, <name>/val.bin   flat token ids, little-endian uint16 (uint32 when vocab_size > 65536)
    <name>/meta.json                  tokenizer, vocab_size, dtype, eot_token, token and document counts, recipe
The files are written into a hidden sibling folder `.<name>.partial/`, meta.json last, and the folder is
renamed to `<name>/` only when complete, so an interrupted run never leaves a folder that looks finished.

Documents:
    stdlib        every `.py` file of the running Python's standard library (tests, idlelib, site-packages and
                  generated tables left out, see STDLIB_SKIP_DIRS), sorted by relative path, up to 8 MB
    .txt          one document per file (--txt_split=file), or one per paragraph (--txt_split=blank_lines: a
                  run of blank lines ends a document), or one per block between lines that hold only
                  --separator (--txt_split=separator, default separator <|endoftext|>, as in TinyStories)
    .jsonl        one document per line, text taken from --text_field (default "text")
    .gz / .zst    compressed .txt and .jsonl (.zst needs `pip install zstandard`)
    .parquet      one document per row of column --text_field (needs `pip install pyarrow`)
    shakespeare   the Tiny Shakespeare file split on blank lines: one document per speech
The tokenizer's end-of-text id is written BEFORE every document, so each split file starts with it and a
model always sees it where a new document begins. Empty documents are skipped and counted.

Re-running with the same options rebuilds and replaces <name>/; a folder that holds a different dataset
(or anything not made here) is refused unless --overwrite. Unreadable files are reported and skipped,
invalid UTF-8 is replaced by U+FFFD and counted, and memory stays bounded whatever the corpus size: input
is read in ~1 MB chunks with at most 4 x num_proc of them in flight, and long documents are cut into pieces.

Split: by document, never inside one. Document i (counted in input order, empty ones excluded) goes to
val when splitmix64(seed, i) / 2**64 < --val_fraction; --val_docs=N instead picks exactly the N documents
with the smallest hashes (one extra reading pass to count documents). Same inputs and options give
byte-identical files, whatever --num_proc is.

Library (imported by train.py and the tests):
    read_meta(data_dir) -> dict            load_split(data_dir, split) -> np.memmap
    get_tokenizer(name, tiktoken_file=None) token_dtype(vocab_size) -> "uint16" | "uint32"
    write_llmc_shard(path, tokens)          read_llmc_shard(path) -> np.memmap   (llm.c / modded-nanogpt format)
    prepare(PrepareConfig(...)) -> meta dict
"""

import argparse
import base64
import codecs
import glob
import gzip
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

FORMAT_VERSION = 1
TOKENIZERS = ("byte", "gpt2", "cl100k_base", "o200k_base")
SOURCES = ("stdlib", "shakespeare")
TXT_SPLITS = ("file", "blank_lines", "separator")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
STDLIB_MAX_BYTES = 8_000_000  # ~8M byte tokens: enough to train a small model, prepared in seconds
# Test suites would dominate the corpus (17 MB of it) and are repetitive; the others are generated tables,
# a GUI app, demos, or third-party packages that differ from machine to machine.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
                              "turtledemo", "pydoc_data", "encodings", "ensurepip", "__pycache__"})
CHUNK_BYTES = 1 << 20  # one unit of work for a worker: big enough to hide the IPC, small enough to bound memory
PIECE_BYTES = 1 << 20  # a longer .txt document is tokenised in pieces cut where BPE cannot merge across
HARD_PIECE_BYTES = 16 << 20  # ... and cut anyway past this, so memory stays bounded on pathological input
READLINE_LIMIT = 1 << 20  # a single huge line is read in parts of this size
PARQUET_BATCH_ROWS = 1024
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
LLMC_SHARD_TOKENS = 100_000_000  # llm.c's fineweb shards hold 1e8 tokens
WHOLE, FIRST, CONT = 0, 1, 2  # a record holds a whole document, the first piece of one, or a later piece


class PrepareError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""


def warn(message: str) -> None:
    print(f"prepare_data.py: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text 256: needs no file and no network."""
    name = "byte"
    vocab_size = 257
    eot_token = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > self.eot_token):
            raise ValueError(f"byte tokenizer ids must be in 0..{self.eot_token}, got {ids.min()}..{ids.max()}")
        parts = np.split(ids, np.flatnonzero(ids == self.eot_token))
        texts = [bytes(part[part != self.eot_token].astype(np.uint8)).decode("utf-8", errors="replace")
                 for part in parts]
        return "<|endoftext|>".join(texts)


class TiktokenTokenizer:
    """A tiktoken Encoding seen through the same small interface as ByteTokenizer."""

    def __init__(self, name: str, encoding):
        self.name = name
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_token = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # Ordinary: a document that contains the text "<|endoftext|>" must not produce the real eot id.
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # Same ids as encode() (with no special token allowed or disallowed, specials are plain text), but
        # straight into a uint32 buffer: building and converting a Python list costs ~15% more time.
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


def get_tokenizer(name: str, tiktoken_file: str | None = None):
    """The tokenizer called `name`; with tiktoken_file its BPE ranks are read from that file, offline."""
    if name not in TOKENIZERS:
        raise PrepareError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")
    if name == "byte":
        return ByteTokenizer()
    if tiktoken_file is not None:
        return TiktokenTokenizer(name, _tiktoken_from_file(name, tiktoken_file))
    import tiktoken
    try:
        return TiktokenTokenizer(name, tiktoken.get_encoding(name))
    except Exception as err:  # requests/urllib/OS errors all mean the same thing to the user
        raise PrepareError(f"the {name} tokenizer files could not be fetched ({type(err).__name__}); "
                           f"pass --tiktoken_file=PATH to a local {name} .tiktoken file, "
                           "or use --tokenizer=byte") from None


def _tiktoken_from_file(name: str, path: str):
    """Build the encoding from tiktoken's own recipe (pattern, special tokens, file hash), ranks from path."""
    import tiktoken
    import tiktoken_ext.openai_public as public
    # gpt2 and r50k_base share ranks, pattern and eot; r50k_base's recipe reads a .tiktoken file.
    recipe = {"gpt2": public.r50k_base, "cl100k_base": public.cl100k_base, "o200k_base": public.o200k_base}[name]
    original = public.load_tiktoken_bpe
    # The recipe calls load_tiktoken_bpe(url, expected_hash=...): answer it from the local file instead,
    # so the pattern strings and hashes come from tiktoken and are not copied here.
    public.load_tiktoken_bpe = lambda _url, expected_hash=None: _read_ranks(path, expected_hash, name)
    try:
        params = recipe()
    finally:
        public.load_tiktoken_bpe = original
    return tiktoken.Encoding(name=name, pat_str=params["pat_str"], mergeable_ranks=params["mergeable_ranks"],
                             special_tokens=params["special_tokens"],
                             explicit_n_vocab=params.get("explicit_n_vocab"))


def _read_ranks(path: str, expected_hash: str | None, name: str) -> dict[bytes, int]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PrepareError(f"cannot read --tiktoken_file={path}: {err.strerror or err}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_hash is not None and digest != expected_hash:
        raise PrepareError(f"--tiktoken_file={path} is not the {name} rank file (sha256 {digest[:12]}..., "
                           f"expected {expected_hash[:12]}...): pass the {name} file or the matching --tokenizer")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def token_dtype(vocab_size: int) -> str:
    """The narrowest little-endian unsigned type that holds every id below vocab_size."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def tokenizer_file_sha256(tiktoken_file: str | None) -> str | None:
    if tiktoken_file is None:
        return None
    return hashlib.sha256(Path(tiktoken_file).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- dataset files

def read_meta(data_dir) -> dict:
    """meta.json of a finished dataset folder (e.g. data/stdlib), checked against its .bin files."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if data_dir.name.endswith(".partial") or not meta_path.is_file():
        raise FileNotFoundError(f"no finished dataset in {data_dir} (meta.json missing): "
                                f"prepare it first with `{prepare_command(data_dir)}`")
    meta = json.loads(meta_path.read_text())
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise ValueError(f"{path} does not hold the {meta[f'{split}_tokens']} tokens meta.json promises: "
                             f"rebuild it with `{prepare_command(data_dir)} --overwrite`")
    return meta


def prepare_command(data_dir) -> str:
    """The command that builds data_dir, for error messages."""
    data_dir = Path(data_dir)
    name = data_dir.name.removeprefix(".").removesuffix(".partial")
    args = {"stdlib": "", "shakespeare": " --source=shakespeare"}.get(name, f" --input=YOUR_FILES --name={name}")
    if data_dir.parent != Path("data"):
        args += f" --out_dir={data_dir.parent}"
    return f"python prepare_data.py{args}"


def load_split(data_dir, split: str) -> np.memmap:
    """The token ids of one split ("train" or "val") as a read-only memmap."""
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=dtype, mode="r")


def write_llmc_shard(path, tokens) -> None:
    """Write tokens in llm.c's shard format: 256 int32 header (magic, version, count), then uint16 ids."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError(f"{path}: llm.c shards store uint16, ids must be in 0..65535")
    if tokens.size >= 1 << 31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 count of an llm.c header")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, tokens.size)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        for start in range(0, tokens.size, 1 << 24):  # blocks, so a memmap input is never read whole
            f.write(np.asarray(tokens[start:start + (1 << 24)], dtype="<u2").tobytes())
    os.replace(tmp, path)


def read_llmc_shard(path) -> np.memmap:
    """The uint16 tokens of an llm.c shard, memory-mapped; ValueError naming the file if it is not one."""
    size = os.path.getsize(path)
    header_bytes = LLMC_HEADER_INTS * 4
    if size < header_bytes:
        raise ValueError(f"{path}: {size} bytes is too small for an llm.c shard ({header_bytes}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header[0] != LLMC_MAGIC:
        raise ValueError(f"{path}: magic number {header[0]} is not {LLMC_MAGIC}: not an llm.c token shard")
    if header[1] != LLMC_VERSION:
        raise ValueError(f"{path}: llm.c shard version {header[1]} is not supported (only {LLMC_VERSION})")
    count = int(header[2])
    if size != header_bytes + 2 * count:
        raise ValueError(f"{path}: header promises {count} tokens ({header_bytes + 2 * count} bytes) "
                         f"but the file has {size} bytes: truncated or corrupt")
    return np.memmap(path, dtype="<u2", mode="r", offset=header_bytes, shape=(count,))


# ----------------------------------------------------------------------------- configuration

def default_num_proc() -> int:
    # The CPUs this process may use (a container may allow fewer than os.cpu_count() reports).
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class PrepareConfig:
    source: str | None = None  # "stdlib" | "shakespeare"; None: "stdlib", or "input" when inputs are given
    inputs: tuple[str, ...] = ()  # files, folders (recursive) and glob patterns, read in the order given
    name: str | None = None  # output folder under out_dir; None: the source name, or the input's stem
    out_dir: str = "data"  # where dataset folders (and downloads/) live
    tokenizer: str = "byte"  # one of TOKENIZERS
    tiktoken_file: str | None = None  # local .tiktoken rank file, to build a tiktoken tokenizer offline
    val_fraction: float = 0.01  # expected share of documents in val (by document hash)
    val_docs: int | None = None  # exactly this many documents in val instead (overrides val_fraction)
    seed: int = 1337  # chooses which documents go to val
    num_proc: int = field(default_factory=default_num_proc)  # tokenising processes; 1: none, all in-process
    max_bytes: int | None = None  # stop at the first document after this many input bytes; None: stdlib 8 MB
    text_field: str = "text"  # the .jsonl key / .parquet column holding the text
    txt_split: str | None = None  # rule for .txt documents (TXT_SPLITS); None: blank_lines for shakespeare
    separator: str = "<|endoftext|>"  # with txt_split="separator": a line holding only this ends a document
    llmc: bool = False  # also write llm.c shards (llmc/train_000000.bin, ...) next to train.bin / val.bin
    overwrite: bool = False  # replace an existing dataset folder built from a different recipe
    progress: bool = True  # tqdm bar on stderr (shown only on a terminal)

    def __post_init__(self):
        self.inputs = tuple(self.inputs)
        if self.inputs and self.source is not None:
            raise PrepareError(f"--source={self.source} and --input both given: use one of them")
        self.source = "input" if self.inputs else (self.source or "stdlib")
        if self.source not in SOURCES + ("input",):
            raise PrepareError(f"unknown --source={self.source}: choose one of {', '.join(SOURCES)}, or --input")
        self.name = self.name or default_name(self.source, self.inputs)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name) or self.name.endswith(".partial"):
            raise PrepareError(f"--name={self.name!r} must be a plain folder name (letters, digits, _ . -)")
        self.txt_split = self.txt_split or ("blank_lines" if self.source == "shakespeare" else "file")
        if self.max_bytes is None and self.source == "stdlib":
            self.max_bytes = STDLIB_MAX_BYTES
        self._check_values()

    def _check_values(self):
        if self.tokenizer not in TOKENIZERS:
            raise PrepareError(f"unknown --tokenizer={self.tokenizer}: choose one of {', '.join(TOKENIZERS)}")
        if self.tokenizer == "byte" and self.tiktoken_file is not None:
            raise PrepareError("--tiktoken_file is for the tiktoken tokenizers: add --tokenizer=gpt2 (or another)")
        if not 0.0 < self.val_fraction < 1.0:
            raise PrepareError(f"--val_fraction={self.val_fraction} must be strictly between 0 and 1")
        if self.val_docs is not None and self.val_docs < 1:
            raise PrepareError(f"--val_docs={self.val_docs} must be at least 1")
        if self.num_proc < 1:
            raise PrepareError(f"--num_proc={self.num_proc} must be at least 1")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise PrepareError(f"--max_bytes={self.max_bytes} must be positive (leave it out for no limit)")
        if self.txt_split not in TXT_SPLITS:
            raise PrepareError(f"unknown --txt_split={self.txt_split}: choose one of {', '.join(TXT_SPLITS)}")
        if self.txt_split == "separator" and not self.separator.strip():
            raise PrepareError("--separator must hold visible characters "
                               "(to split on blank lines use --txt_split=blank_lines)")


def default_name(source: str, inputs: tuple[str, ...]) -> str:
    """The source's name, or for a single input its stem (corpus.jsonl.gz -> corpus, texts/*.txt -> texts)."""
    if source != "input":
        return source
    if len(inputs) != 1:
        raise PrepareError(f"{len(inputs)} inputs given: name the dataset with --name=NAME")
    path = Path(inputs[0])
    while glob.has_magic(str(path)) and path != path.parent:
        path = path.parent
    name = path.resolve().name
    while Path(name).suffix.lower() in (".gz", ".zst", ".txt", ".jsonl", ".parquet"):
        name = Path(name).stem
    if not name:
        raise PrepareError(f"cannot derive a dataset name from --input={inputs[0]}: pass --name=NAME")
    return name


# ----------------------------------------------------------------------------- finding the input files

@dataclass(frozen=True)
class InputFile:
    path: Path
    fmt: str  # "txt" | "jsonl" | "parquet"
    compression: str = ""  # "" | "gz" | "zst"


def input_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) read from the file name, or None if the file is not a supported input."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop()[1:] if suffixes and suffixes[-1] in (".gz", ".zst") else ""
    fmt = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}.get(suffixes[-1] if suffixes else "")
    if fmt is None or (fmt == "parquet" and compression):
        return None
    return fmt, compression


def resolve_inputs(patterns) -> list[InputFile]:
    """Every supported file named by the patterns, in the order given, each folder and glob sorted."""
    files, seen = [], set()
    for pattern in patterns:
        matched = _expand(pattern)
        if not matched:
            raise PrepareError(f"--input={pattern} matched no .txt, .jsonl or .parquet file (.gz/.zst allowed)")
        for file in matched:
            key = file.path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files


def _expand(pattern: str) -> list[InputFile]:
    explicit = not glob.has_magic(pattern)
    paths = [Path(pattern)] if explicit else [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    found = []
    for path in paths:
        if path.is_dir():
            found.extend(_folder_files(path))
        elif path.is_file() and input_format(path) is not None:
            found.append(InputFile(path, *input_format(path)))
        elif explicit and path.is_file():
            raise PrepareError(f"--input={pattern}: unsupported file type; use .txt, .jsonl, .parquet "
                               "(or .txt.gz, .jsonl.gz, .txt.zst, .jsonl.zst)")
    return found


def _folder_files(folder: Path) -> list[InputFile]:
    """Supported files under folder, recursively, hidden ones skipped, sorted by relative path."""
    found = []
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.is_file() and input_format(path) is not None:
            found.append(InputFile(path, *input_format(path)))
    return found


def stdlib_files() -> list[InputFile]:
    """The standard library's .py files, tests and generated code left out, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP_DIRS]  # prune: site-packages is huge
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(folder, name)
                files.append((path.relative_to(root).as_posix(), InputFile(path, "txt")))
    if not files:
        raise PrepareError(f"found no .py files under {root}: use --input=... or --source=shakespeare")
    return [file for _, file in sorted(files, key=lambda pair: pair[0])]


def fetch_shakespeare(out_dir) -> Path:
    """The Tiny Shakespeare text, downloaded once into out_dir/downloads/."""
    cache = Path(out_dir) / "downloads" / "tinyshakespeare.txt"
    if cache.is_file():
        return cache
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PrepareError(f"could not download Tiny Shakespeare ({reason}); save {SHAKESPEARE_URL} as {cache} "
                           "or pass a copy with --input=PATH --txt_split=blank_lines") from None
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cache)
    return cache


def source_files(config: PrepareConfig) -> list[InputFile]:
    if config.source == "stdlib":
        return stdlib_files()
    if config.source == "shakespeare":
        return [InputFile(fetch_shakespeare(config.out_dir), "txt")]
    return resolve_inputs(config.inputs)


# ----------------------------------------------------------------------------- reading records (parent process)

class Record(NamedTuple):
    """A unit of raw input: one .txt document or piece of one, or a block of .jsonl lines, or parquet rows."""
    fmt: str  # "text" (bytes, one piece), "jsonl" (bytes, one document per line), "strings" (list of str)
    kind: int  # WHOLE | FIRST | CONT, for "text"; the others always hold whole documents
    payload: object
    origin: str  # file name, for messages
    line: int = 1  # number of the first line in payload (jsonl)
    text_field: str = "text"


class Budget:
    """Input bytes read so far, against --max_bytes; checked before each new document starts."""

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.spent = 0

    def exhausted(self) -> bool:
        return self.max_bytes is not None and self.spent >= self.max_bytes


@dataclass
class ReadStats:
    files_read: int = 0
    unreadable_files: int = 0


def iter_records(files, config: PrepareConfig, budget: Budget, stats: ReadStats) -> Iterator[Record]:
    """Records from every file in order; unreadable files are reported, counted and skipped."""
    for file in files:
        if budget.exhausted():
            return
        try:
            yield from _file_records(file, config, budget)
        except _read_errors() as err:
            stats.unreadable_files += 1
            warn(f"could not read {file.path} ({err}); skipped it from that point on")
        else:
            stats.files_read += 1


def _read_errors() -> tuple:
    """Exception types that mean "this file is unreadable or corrupt" (the optional readers add theirs)."""
    errors = [OSError, EOFError, zlib.error, ValueError]  # pyarrow's ArrowInvalid is a ValueError
    if "zstandard" in sys.modules and sys.modules["zstandard"] is not None:
        errors.append(sys.modules["zstandard"].ZstdError)
    return tuple(errors)


def _file_records(file: InputFile, config: PrepareConfig, budget: Budget) -> Iterator[Record]:
    if file.fmt == "parquet":
        yield from _read_parquet(file.path, config.text_field, budget)
        return
    with _open_binary(file) as fh:
        if file.fmt == "jsonl":
            yield from _read_jsonl(fh, str(file.path), config.text_field, budget)
        else:
            yield from _read_text(fh, str(file.path), config, budget)


def _optional_import(module: str, package: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PrepareError(f"{purpose} needs the optional package {package}: pip install {package}") from None


def _open_binary(file: InputFile):
    if file.compression == "gz":
        return gzip.open(file.path, "rb")
    if file.compression == "zst":
        zstandard = _optional_import("zstandard", "zstandard", f"reading {file.path.name}")
        return io.BufferedReader(zstandard.open(file.path, "rb"))
    return open(file.path, "rb")


def _read_jsonl(fh, origin: str, text_field: str, budget: Budget) -> Iterator[Record]:
    """Blocks of about CHUNK_BYTES of whole lines; the workers parse them."""
    block, size, first = [], 0, 1
    for lineno, line in enumerate(fh, start=1):
        if budget.exhausted():
            break
        budget.spent += len(line)
        if not block:
            first = lineno
        block.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield Record("jsonl", WHOLE, b"".join(block), origin, first, text_field)
            block, size = [], 0
    if block:
        yield Record("jsonl", WHOLE, b"".join(block), origin, first, text_field)


def _read_parquet(path: Path, text_field: str, budget: Budget) -> Iterator[Record]:
    parquet = _optional_import("pyarrow.parquet", "pyarrow", f"reading {path.name}")
    table = parquet.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        columns = ", ".join(table.schema_arrow.names)
        raise PrepareError(f"{path} has no column {text_field!r} (columns: {columns}): pass --text_field=COLUMN")
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        texts = []
        for text in batch.column(0).to_pylist():
            if budget.exhausted():
                break
            texts.append(text or "")
            budget.spent += len(texts[-1])  # characters, not bytes: close enough for a size cap
        yield Record("strings", WHOLE, texts, str(path))
        if budget.exhausted():
            return


def _read_text(fh, origin: str, config: PrepareConfig, budget: Budget) -> Iterator[Record]:
    """Documents of a text file under config.txt_split, long ones in pieces."""
    doc = _PieceBuffer(origin)
    separator = config.separator.encode("utf-8").strip()
    for line in iter(partial(fh.readline, READLINE_LIMIT), b""):
        if _ends_document(line, config.txt_split, separator):
            budget.spent += len(line)
            yield from doc.finish()
            continue
        if doc.is_empty() and budget.exhausted():
            return
        budget.spent += len(line)
        yield from doc.add(line)
    # Under the file rule an empty file is still a document: emit it, so it is counted as empty.
    yield from doc.finish(even_empty=config.txt_split == "file")


def _ends_document(line: bytes, txt_split: str, separator: bytes) -> bool:
    if txt_split == "blank_lines":
        return not line.strip()
    if txt_split == "separator":
        return line.strip() == separator
    return False


class _PieceBuffer:
    """The lines of the document being read; cut into pieces when it grows past PIECE_BYTES."""

    def __init__(self, origin: str):
        self.origin = origin
        self.lines: list[bytes] = []
        self.size = 0
        self.started = False  # a first piece of this document was already emitted

    def is_empty(self) -> bool:
        return not self.lines and not self.started

    def add(self, line: bytes) -> Iterator[Record]:
        if self.size >= PIECE_BYTES and (self.size >= HARD_PIECE_BYTES or _safe_cut(self.lines[-1], line)):
            data, carry = _split_incomplete_utf8(b"".join(self.lines))
            yield Record("text", CONT if self.started else FIRST, data, self.origin)
            self.started = True
            self.lines, self.size = ([carry], len(carry)) if carry else ([], 0)
        self.lines.append(line)
        self.size += len(line)

    def finish(self, even_empty: bool = False) -> Iterator[Record]:
        if self.lines or (even_empty and not self.started):
            yield Record("text", CONT if self.started else WHOLE, b"".join(self.lines), self.origin)
        self.lines, self.size, self.started = [], 0, False


def _safe_cut(previous: bytes, line: bytes) -> bool:
    """True where tokenising the two sides apart gives the same ids as together.

    The gpt2, cl100k and o200k pre-tokenisers never join a newline that follows a visible ASCII character
    with a letter or digit that starts the next line, so BPE cannot merge across such a cut.
    """
    return (len(previous) >= 2 and previous.endswith(b"\n") and 0x21 <= previous[-2] <= 0x7E
            and line[:1].isalnum())


def _split_incomplete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """(data without a trailing incomplete UTF-8 character, that incomplete tail)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): its sequence starts here
            needed = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return (data[:-back], data[-back:]) if needed > back else (data, b"")
    return data, b""


def chunk_records(records: Iterator[Record]) -> Iterator[list[Record]]:
    """Group records into work units of about CHUNK_BYTES."""
    chunk, size = [], 0
    for record in records:
        chunk.append(record)
        size += _payload_size(record)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _payload_size(record: Record) -> int:
    if record.fmt == "strings":
        return sum(len(text) for text in record.payload)
    return len(record.payload)


# ----------------------------------------------------------------------------- tokenising (worker processes)

# The tokenizer of this process, set once by init_worker: building one costs ~0.4 s. A forked worker
# inherits the parent's, so only spawned workers build their own.
_worker_tokenizer = None
_worker_tokenizer_key = None


def init_worker(tokenizer_name: str, tiktoken_file: str | None, tokenizer=None) -> None:
    global _worker_tokenizer, _worker_tokenizer_key
    if _worker_tokenizer_key != (tokenizer_name, tiktoken_file):
        _worker_tokenizer = tokenizer or get_tokenizer(tokenizer_name, tiktoken_file)
        _worker_tokenizer_key = (tokenizer_name, tiktoken_file)


class ChunkResult(NamedTuple):
    tokens: np.ndarray  # token ids of every piece, in order, eot before each document start
    lengths: np.ndarray  # (pieces,) ids per piece, eot included; 0 for an empty document
    kinds: np.ndarray  # (pieces,) WHOLE | FIRST | CONT
    input_bytes: int
    replaced: int  # invalid UTF-8 bytes (and lone surrogates) replaced by U+FFFD
    bad_json: int
    bad_json_example: str  # where the first bad line was, for the warning


_replaced_counter = [0]  # the error handler below has no other way to report to its caller


def _count_and_replace(err: UnicodeDecodeError):
    _replaced_counter[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("prepare_data_count_replace", _count_and_replace)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _ChunkBuilder:
    """Collects the pieces of one chunk inside a worker."""

    def __init__(self, count_only: bool):
        self.count_only = count_only
        self.tokenizer = _worker_tokenizer
        self.arrays, self.lengths, self.kinds = [], [], []
        self.replaced = self.bad_json = 0
        self.bad_json_example = ""

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            before = _replaced_counter[0]
            text = data.decode("utf-8", errors="prepare_data_count_replace")
            self.replaced += _replaced_counter[0] - before
            return text

    def add(self, text: str, kind: int) -> None:
        if kind == WHOLE and not text.strip():
            length = 0  # empty document: skipped, and counted by the parent
        elif self.count_only:
            length = 1
        else:
            ids = self.tokenizer.encode_array(text)
            if kind != CONT:
                self.arrays.append(np.array([self.tokenizer.eot_token], dtype=np.uint32))
            self.arrays.append(ids)
            length = len(ids) + (kind != CONT)
        self.lengths.append(length)
        self.kinds.append(kind)

    def result(self, input_bytes: int) -> ChunkResult:
        dtype = np.dtype(token_dtype(self.tokenizer.vocab_size)).newbyteorder("<")
        tokens = np.concatenate(self.arrays).astype(dtype) if self.arrays else np.zeros(0, dtype)
        return ChunkResult(tokens, np.array(self.lengths, dtype=np.int64), np.array(self.kinds, dtype=np.int8),
                           input_bytes, self.replaced, self.bad_json, self.bad_json_example)


def process_chunk(records: list[Record], count_only: bool = False) -> ChunkResult:
    """Decode and tokenise one chunk (runs in a worker); count_only skips tokenising."""
    builder = _ChunkBuilder(count_only=count_only)
    for record in records:
        if record.fmt == "text":
            builder.add(builder.decode(record.payload), record.kind)
        elif record.fmt == "jsonl":
            _add_jsonl(builder, record)
        else:
            for text in record.payload:
                builder.add(text, WHOLE)
    return builder.result(input_bytes=sum(_payload_size(record) for record in records))


def _add_jsonl(builder: _ChunkBuilder, record: Record) -> None:
    for offset, line in enumerate(record.payload.split(b"\n")):
        if not line.strip():
            continue
        text = _jsonl_text(builder, line, where=f"{record.origin}:{record.line + offset}",
                           text_field=record.text_field)
        if text is not None:
            builder.add(text, WHOLE)


def _jsonl_text(builder: _ChunkBuilder, line: bytes, where: str, text_field: str) -> str | None:
    """The text of one jsonl line; None (counted) when the line is not valid JSON."""
    try:
        obj = json.loads(builder.decode(line))
    except ValueError:
        builder.bad_json += 1
        builder.bad_json_example = builder.bad_json_example or where
        return None
    if not isinstance(obj, dict) or text_field not in obj:
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise PrepareError(f"{where}: no field {text_field!r} (found: {keys}); pass --text_field=FIELD")
    text = obj[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise PrepareError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text")
    if b"\\ud" in line or b"\\uD" in line:  # JSON can spell lone surrogates, which are not encodable text
        text, count = _SURROGATE.subn("\ufffd", text)
        builder.replaced += count
    return text


# ----------------------------------------------------------------------------- the split

def split_hashes(seed: int, doc_ids: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, document index): uniform, and distinct for distinct indices (a bijection)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        return _splitmix64(np.asarray(doc_ids).astype(np.uint64) + key)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fraction_threshold(val_fraction: float) -> int:
    """Documents whose hash is below this go to val."""
    return min(int(val_fraction * 2.0 ** 64), 2 ** 64 - 1)


def docs_threshold(seed: int, n_docs: int, val_docs: int) -> int:
    """The threshold that puts exactly val_docs of n_docs documents in val, in memory O(val_docs)."""
    if n_docs == 0:
        raise PrepareError("empty corpus: no non-empty document found; "
                           "check --input, --text_field and --txt_split")
    if val_docs >= n_docs:
        raise PrepareError(f"--val_docs={val_docs} leaves no training document: the corpus has {n_docs}")
    smallest = np.zeros(0, dtype=np.uint64)
    for start in range(0, n_docs, 1 << 20):
        block = split_hashes(seed, np.arange(start, min(start + (1 << 20), n_docs)))
        smallest = np.partition(np.concatenate([smallest, block]), val_docs)[:val_docs + 1]
    return int(np.sort(smallest)[val_docs])


class SplitWriter:
    """Appends each chunk's documents to train.bin or val.bin, deciding the split per document."""

    def __init__(self, folder: Path, seed: int, threshold: int):
        self.seed = seed
        self.threshold = np.uint64(threshold)
        self.files = {"train": open(folder / "train.bin", "wb"), "val": open(folder / "val.bin", "wb")}
        self.tokens = {"train": 0, "val": 0}
        self.documents = {"train": 0, "val": 0}
        self.next_doc = 0  # index of the next non-empty document
        self.empty_documents = self.replaced = self.bad_json = self.input_bytes = 0

    def add(self, result: ChunkResult) -> None:
        starts = (result.kinds != CONT) & (result.lengths > 0)
        # A CONT piece belongs to the document started last, possibly in an earlier chunk.
        doc_ids = self.next_doc - 1 + np.cumsum(starts)
        is_val = split_hashes(self.seed, doc_ids) < self.threshold
        in_val = np.repeat(is_val, result.lengths)
        for split, mask in (("train", ~in_val), ("val", in_val)):
            part = result.tokens[mask]
            self.files[split].write(part.tobytes())
            self.tokens[split] += int(part.size)
        self.documents["val"] += int((starts & is_val).sum())
        self.documents["train"] += int((starts & ~is_val).sum())
        self.next_doc += int(starts.sum())
        self._count(result)

    def _count(self, result: ChunkResult) -> None:
        self.empty_documents += int(((result.kinds == WHOLE) & (result.lengths == 0)).sum())
        self.replaced += result.replaced
        self.bad_json += result.bad_json
        self.input_bytes += result.input_bytes
        if result.bad_json and self.bad_json == result.bad_json:
            warn(f"skipped a line that is not valid JSON at {result.bad_json_example} (more are only counted)")

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# ----------------------------------------------------------------------------- the pipeline

@contextmanager
def worker_pool(num_proc: int, tokenizer_name: str, tiktoken_file: str | None, tokenizer=None):
    """A pool of tokenising processes, or None when num_proc == 1 (then chunks run in this process)."""
    init_worker(tokenizer_name, tiktoken_file, tokenizer=tokenizer)
    if num_proc == 1:
        yield None
        return
    pool = multiprocessing.Pool(num_proc, initializer=init_worker, initargs=(tokenizer_name, tiktoken_file))
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def ordered_results(pool, func, items, max_pending: int) -> Iterator:
    """func over items, results in input order, with at most max_pending items in flight.

    Pool.imap would read the whole input ahead of the workers; this keeps memory bounded.
    """
    if pool is None:
        yield from map(func, items)
        return
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def run_pass(config: PrepareConfig, files, tokenizer, consume, count_only: bool) -> ReadStats:
    """Read, tokenise (unless count_only) and hand every chunk result, in order, to consume."""
    stats, budget = ReadStats(), Budget(config.max_bytes)
    chunks = chunk_records(iter_records(files, config, budget, stats))
    with worker_pool(config.num_proc, config.tokenizer, config.tiktoken_file, tokenizer=tokenizer) as pool:
        func = partial(process_chunk, count_only=count_only)
        for result in ordered_results(pool, func, chunks, max_pending=4 * config.num_proc):
            consume(result)
    return stats


def count_documents(config: PrepareConfig, files, tokenizer) -> int:
    """Non-empty documents in the input: the extra pass that --val_docs needs."""
    total = [0]

    def consume(result: ChunkResult) -> None:
        total[0] += int(((result.kinds != CONT) & (result.lengths > 0)).sum())

    run_pass(config, files, tokenizer, consume=consume, count_only=True)
    return total[0]


def write_splits(config: PrepareConfig, files, tokenizer, threshold: int, folder: Path) -> dict:
    """Write train.bin and val.bin into folder; return the counts for meta.json."""
    from tqdm import tqdm
    writer = SplitWriter(folder, seed=config.seed, threshold=threshold)
    start = time.perf_counter()
    bar = tqdm(unit=" docs", disable=None if config.progress else True, mininterval=0.5)
    try:
        def consume(result: ChunkResult) -> None:
            before = sum(writer.documents.values())
            writer.add(result)
            seconds = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{sum(writer.tokens.values()):,} tokens, "
                                f"{writer.input_bytes / seconds / 1e6:.1f} MB/s", refresh=False)
            bar.update(sum(writer.documents.values()) - before)

        stats = run_pass(config, files, tokenizer, consume=consume, count_only=False)
    finally:
        bar.close()
        writer.close()
    return _counts(writer, stats, files)


def _counts(writer: SplitWriter, stats: ReadStats, files) -> dict:
    return {
        "train_tokens": writer.tokens["train"], "val_tokens": writer.tokens["val"],
        "train_documents": writer.documents["train"], "val_documents": writer.documents["val"],
        "empty_documents_skipped": writer.empty_documents, "unreadable_files_skipped": stats.unreadable_files,
        "bad_json_lines_skipped": writer.bad_json, "replaced_invalid_bytes": writer.replaced,
        "input_bytes": writer.input_bytes, "input_files_read": stats.files_read, "input_files_found": len(files),
    }


def check_counts(counts: dict, config: PrepareConfig) -> None:
    documents = counts["train_documents"] + counts["val_documents"]
    if documents == 0:
        raise PrepareError(f"empty corpus: {counts['input_files_read']} files read, no non-empty document "
                           f"({counts['empty_documents_skipped']} empty, {counts['unreadable_files_skipped']} "
                           "unreadable); check --input, --text_field and --txt_split")
    if counts["val_documents"] == 0:
        raise PrepareError(f"val split is empty: --val_fraction={config.val_fraction} put none of the "
                           f"{documents} documents in val; raise --val_fraction or pass --val_docs=N")
    if counts["train_documents"] == 0:
        raise PrepareError(f"train split is empty: all {documents} documents went to val; "
                           "lower --val_fraction or pass --val_docs=N")


def recipe(config: PrepareConfig) -> dict:
    """Everything that determines the dataset's content; equal recipes may replace each other's output."""
    inputs = {"stdlib": [sysconfig.get_paths()["stdlib"]], "shakespeare": [SHAKESPEARE_URL]}
    return {
        "source": config.source, "inputs": inputs.get(config.source, list(config.inputs)),
        "tokenizer": config.tokenizer, "tiktoken_file_sha256": tokenizer_file_sha256(config.tiktoken_file),
        "val_fraction": None if config.val_docs else config.val_fraction, "val_docs": config.val_docs,
        "seed": config.seed, "max_bytes": config.max_bytes, "text_field": config.text_field,
        "txt_split": config.txt_split, "separator": config.separator if config.txt_split == "separator" else None,
        "llmc": config.llmc,
        "python": sys.version.split()[0] if config.source == "stdlib" else None,
    }


def build_meta(config: PrepareConfig, tokenizer, counts: dict) -> dict:
    tokens = counts["train_tokens"] + counts["val_tokens"]
    return {
        "format_version": FORMAT_VERSION, "name": config.name,
        "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token,
        "dtype": token_dtype(tokenizer.vocab_size), "eot_placement": "before_each_document",
        **counts,
        "input_bytes_per_token": round(counts["input_bytes"] / max(tokens, 1), 4),
        "recipe": recipe(config),
    }


def check_existing(final: Path, expected_recipe: dict, overwrite: bool) -> None:
    """Refuse to replace a folder that holds something other than this recipe's dataset."""
    if overwrite or not final.exists():
        return
    meta_path = final / "meta.json"
    if meta_path.is_file():
        try:
            existing = json.loads(meta_path.read_text())
        except ValueError:
            existing = {}
        if existing.get("recipe") == expected_recipe:
            return  # the same recipe: rebuild (the inputs may have changed) and replace
        raise PrepareError(f"{final} already holds a different dataset (tokenizer {existing.get('tokenizer')}, "
                           f"source {existing.get('recipe', {}).get('source')}); pass --overwrite to replace it "
                           "or choose another --name")
    if not final.is_dir() or any(final.iterdir()):
        raise PrepareError(f"{final} exists and was not written by prepare_data.py (no meta.json); "
                           "pass --overwrite to replace it or choose another --name")


def fresh_partial_dir(final: Path) -> Path:
    partial_dir = final.with_name(f".{final.name}.partial")
    if partial_dir.exists():
        warn(f"removing {partial_dir}, left by an interrupted run")
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(parents=True)
    return partial_dir


def replace_dir(partial_dir: Path, final: Path) -> None:
    """Move the finished folder into place; the old one is removed only after."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.is_dir():
        final.rename(old)
    elif final.exists():
        final.unlink()
    partial_dir.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_llmc(folder: Path, meta: dict) -> dict:
    """Copy each split into llm.c shards of LLMC_SHARD_TOKENS tokens; return the shard names per split."""
    if meta["dtype"] != "uint16":
        raise PrepareError(f"--llmc needs ids below 65536; {meta['tokenizer']} has {meta['vocab_size']}")
    (folder / "llmc").mkdir()
    shards = {}
    for split in ("train", "val"):
        tokens = np.memmap(folder / f"{split}.bin", dtype="<u2", mode="r") if meta[f"{split}_tokens"] else []
        shards[split] = []
        for index, start in enumerate(range(0, len(tokens), LLMC_SHARD_TOKENS)):
            shards[split].append(f"llmc/{split}_{index:06d}.bin")
            write_llmc_shard(folder / shards[split][-1], tokens[start:start + LLMC_SHARD_TOKENS])
    return shards


def prepare(config: PrepareConfig) -> dict:
    """Build out_dir/name from config; return its meta.json content. Raises PrepareError on user errors."""
    tokenizer = get_tokenizer(config.tokenizer, config.tiktoken_file)
    files = source_files(config)
    final = Path(config.out_dir) / config.name
    check_existing(final, recipe(config), config.overwrite)
    threshold = fraction_threshold(config.val_fraction)
    if config.val_docs is not None:
        n_docs = count_documents(config, files, tokenizer)
        threshold = docs_threshold(config.seed, n_docs=n_docs, val_docs=config.val_docs)
    partial_dir = fresh_partial_dir(final)
    try:
        counts = write_splits(config, files, tokenizer, threshold=threshold, folder=partial_dir)
        check_counts(counts, config)
        meta = build_meta(config, tokenizer, counts)
        if config.llmc:
            meta["llmc_shards"] = write_llmc(partial_dir, meta)
        # meta.json last: its presence is what marks a dataset folder as complete.
        (partial_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(partial_dir, final)
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    return meta


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0],
                                epilog="The document rules: see the docstring, head -45 prepare_data.py")
    p.add_argument("--source", choices=SOURCES, help="named corpus (default: stdlib when no --input)")
    p.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="files, folders or glob patterns: .txt .jsonl (.gz .zst) .parquet")
    p.add_argument("--name", help="dataset folder name under --out_dir (default: source or input stem)")
    p.add_argument("--out_dir", default="data")
    p.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    p.add_argument("--tiktoken_file", help="local .tiktoken rank file: build the tokenizer offline")
    p.add_argument("--val_fraction", type=float, default=0.01, help="share of documents in val (default 0.01)")
    p.add_argument("--val_docs", type=int, help="exactly N documents in val instead")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_proc", type=int, default=default_num_proc(), help="tokenising processes")
    p.add_argument("--max_bytes", type=int, help=f"input size cap (default: {STDLIB_MAX_BYTES} for stdlib, none)")
    p.add_argument("--text_field", default="text", help="jsonl key / parquet column (default text)")
    p.add_argument("--txt_split", choices=TXT_SPLITS,
                   help="documents in .txt (default: file; blank_lines for shakespeare)")
    p.add_argument("--separator", default="<|endoftext|>", help="with --txt_split=separator")
    p.add_argument("--llmc", action="store_true", help="also write llm.c shards into <name>/llmc/")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset of the same name")
    return p


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(source=args.source, inputs=tuple(args.input), name=args.name, out_dir=args.out_dir,
                         tokenizer=args.tokenizer, tiktoken_file=args.tiktoken_file,
                         val_fraction=args.val_fraction, val_docs=args.val_docs, seed=args.seed,
                         num_proc=args.num_proc, max_bytes=args.max_bytes, text_field=args.text_field,
                         txt_split=args.txt_split, separator=args.separator, llmc=args.llmc,
                         overwrite=args.overwrite)


def summary(meta: dict, folder: Path, seconds: float) -> str:
    return "\n".join([
        f"wrote {folder}: {meta['train_documents']:,} train / {meta['val_documents']:,} val documents, "
        f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']})",
        f"tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']:,}, eot {meta['eot_token']}), "
        f"{meta['input_bytes_per_token']:.2f} input bytes/token, "
        f"{meta['input_bytes'] / 1e6:.1f} MB in {seconds:.1f} s "
        f"({meta['input_bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)",
        f"skipped {meta['empty_documents_skipped']} empty documents, {meta['unreadable_files_skipped']} "
        f"unreadable files, {meta['bad_json_lines_skipped']} bad json lines; "
        f"replaced {meta['replaced_invalid_bytes']} invalid UTF-8 bytes",
    ])


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        config = config_from_args(args)
        meta = prepare(config)
    except PrepareError as err:
        sys.exit(f"prepare_data.py: error: {err}")
    except KeyboardInterrupt:
        sys.exit("prepare_data.py: interrupted; no dataset was written")
    print(summary(meta, Path(config.out_dir) / config.name, time.perf_counter() - start))


if __name__ == "__main__":
    main()
