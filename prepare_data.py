"""
Tokenise text into the flat files train.py reads: data/<name>/train.bin, val.bin and meta.json.

    python prepare_data.py                                   # embedded default: Python's stdlib sources, bytes
    python prepare_data.py --input=notes/ --input="*.txt" --name=mine --tokenizer=gpt2
    python prepare_data.py --tokenizer=gpt2 --tiktoken_file=/path/to/gpt2.tiktoken   # offline GPT-2

Each input file is one document. Documents go whole to train or to validation (a hash of the seed
and the document's index decides), each followed by the end-of-text token. Token ids are stored as
uint16, or uint32 when the vocabulary needs it. The dataset is written into a temporary folder
that is renamed at the end, meta.json last, so an interrupted run never leaves a folder that
train.py would accept.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

TIKTOKEN_NAMES = ("gpt2", "cl100k_base", "o200k_base")
EMBEDDED = "stdlib"
# Folders of the standard library left out of the embedded corpus: third-party code and the
# stdlib's own test suite (large, repetitive data files), plus generated tables.
STDLIB_SKIP = ("site-packages", "test", "tests", "idle_test", "__pycache__", "encodings")


class DataError(Exception):
    """A problem with the input or the options: printed as one line, exit code 2."""


class ByteTokenizer:
    """Raw UTF-8 bytes 0..255, end-of-text 256. Needs no file."""
    name, vocab_size, eot_token = "byte", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    def __init__(self, name, encoding):
        self.name, self.enc = name, encoding
        self.eot_token = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # special-token text in a document is just text

    def decode(self, ids):
        return self.enc.decode(ids)


def get_tokenizer(name, tiktoken_file=None):
    """'byte' or a tiktoken encoding; tiktoken_file loads the ranks from a local .tiktoken file."""
    if name == "byte":
        return ByteTokenizer()
    if name not in TIKTOKEN_NAMES:
        raise DataError(f"unknown tokenizer {name!r}: choose byte or one of {', '.join(TIKTOKEN_NAMES)}")
    import tiktoken
    if tiktoken_file:
        return TiktokenTokenizer(name, encoding_from_file(name, tiktoken_file))
    try:
        return TiktokenTokenizer(name, tiktoken.get_encoding(name))
    except Exception as e:  # offline: tiktoken raises whatever its HTTP client raised
        raise DataError(f"the {name} tokenizer files could not be fetched ({type(e).__name__}); on an offline machine "
                        f"pass --tiktoken_file=PATH/{name}.tiktoken, or use --tokenizer=byte") from None


def encoding_from_file(name, path):
    """A tiktoken Encoding from local ranks. tiktoken's own constructor supplies the split pattern
    and special tokens; only its download of the ranks is redirected to the local file."""
    import tiktoken
    from unittest import mock
    from tiktoken import load as tiktoken_load
    from tiktoken_ext import openai_public
    if not os.path.isfile(path):
        raise DataError(f"--tiktoken_file={path} does not exist")
    ranks = tiktoken_load.load_tiktoken_bpe(path)
    local = lambda *args, **kwargs: ranks  # noqa: E731  (stands in for both of tiktoken's loaders)
    with mock.patch.object(openai_public, "load_tiktoken_bpe", local), \
            mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", local):
        spec = getattr(openai_public, name)()
    return tiktoken.Encoding(name=spec["name"], pat_str=spec["pat_str"], mergeable_ranks=spec["mergeable_ranks"],
                             special_tokens=spec["special_tokens"])


# ----------------------------------------------------------------------------------------------
# reading documents

class Counts:
    """What was read, skipped and repaired, for the summary and meta.json."""

    def __init__(self):
        self.documents = self.empty = self.unreadable = self.replaced_bytes = self.bytes = 0


def decode(raw, counts):
    """UTF-8 text; invalid bytes become U+FFFD and are counted, never fatal."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        counts.replaced_bytes += text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
        return text


def read_bytes(path, counts):
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except OSError as e:
        counts.unreadable += 1
        tqdm.write(f"warning: skipping unreadable {path}: {e}")
        return None


def documents_of_file(path, counts, txt_split, text_field):
    """Yield the documents of one file: a JSON Lines file has one per line (field text_field);
    a text file is one document, or with txt_split=blank_line, one per block between empty lines."""
    raw = read_bytes(path, counts)
    if raw is None:
        return
    counts.bytes += len(raw)
    text = decode(raw, counts)
    name = str(path)[:-3] if str(path).endswith(".gz") else str(path)
    if name.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield json_text(line, text_field, path, n)
    elif txt_split == "blank_line":
        yield from re.split(r"\n[ \t]*\n", text)
    else:
        yield text


def json_text(line, field, path, n):
    try:
        return json.loads(line)[field]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{path}:{n}: not a JSON object with a {field!r} field (choose it with --text_field)") from None


def expand_inputs(patterns):
    """Files from paths, folders (recursively) and glob patterns, sorted so the order is fixed."""
    files = []
    for pattern in patterns:
        matches = glob.glob(pattern, recursive=True) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DataError(f"--input={pattern} matches no file or folder")
        for m in sorted(matches):
            files += sorted(p for p in Path(m).rglob("*") if p.is_file()) if os.path.isdir(m) else [Path(m)]
    if not files:
        raise DataError(f"--input={' '.join(patterns)} holds no files")
    return files


def stdlib_files(max_bytes):
    """The embedded default: the .py sources of the running Python's standard library, sorted by
    relative path, up to max_bytes in total. Every Python install carries them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if any(part in STDLIB_SKIP for part in path.relative_to(root).parts[:-1]):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


# ----------------------------------------------------------------------------------------------
# writing the dataset

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def is_validation(index, seed, val_fraction):
    """A document's split, from a hash of (seed, index): fixed for given options, independent of
    everything else, and never both."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < val_fraction


def write_dataset(out_dir, files, tok, args, counts):
    """Tokenise document by document into <out_dir>.tmp/, then rename it to out_dir."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = token_dtype(tok.vocab_size)
    sizes = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    with open(os.path.join(tmp, "train.bin"), "wb") as ftrain, open(os.path.join(tmp, "val.bin"), "wb") as fval, \
            tqdm(files, unit="file", dynamic_ncols=True, mininterval=1.0) as bar:
        for path in bar:
            for text in documents_of_file(path, counts, args.txt_split, args.text_field):
                if not text.strip():
                    counts.empty += 1
                    continue
                split = "val" if is_validation(counts.documents, args.seed, args.val_fraction) else "train"
                ids = np.array(tok.encode(text) + [tok.eot_token], dtype=dtype)
                ids.tofile(fval if split == "val" else ftrain)
                sizes[split] += len(ids)
                docs[split] += 1
                counts.documents += 1
            bar.set_postfix(docs=counts.documents, tokens=sizes["train"] + sizes["val"], refresh=False)
    return tmp, sizes, docs, np.dtype(dtype).name


def check_splits(docs, tmp):
    if docs["train"] + docs["val"] == 0:
        shutil.rmtree(tmp)
        raise DataError("the corpus is empty: every input document was empty or unreadable")
    for split in ("train", "val"):
        if docs[split] == 0:
            shutil.rmtree(tmp)
            raise DataError(f"no document went to {split} ({docs['train'] + docs['val']} documents in all): "
                            f"change --val_fraction, or use --txt_split=blank_line to cut text files into more documents")


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"no dataset at {data_dir} (meta.json missing): run `python prepare_data.py` for the "
                        f"embedded default, or `python prepare_data.py --input=YOUR_FILES --name=NAME`")
    with open(path) as f:
        return json.load(f)


def finish(out_dir, tmp, meta):
    """meta.json last, then the rename: a folder without it is never a dataset."""
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


# ----------------------------------------------------------------------------------------------

def fingerprint(args, files):
    """What decides the dataset's content: the options and each file's path and size."""
    h = hashlib.blake2b(digest_size=16)
    for path in files:
        h.update(f"{path}\0{os.path.getsize(path)}\0".encode())
    options = [args.tokenizer, args.val_fraction, args.seed, args.txt_split, args.text_field, len(files)]
    h.update(json.dumps(options).encode())
    return h.hexdigest()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--input", action="append", default=[],
                   help="a file, folder or glob; repeat for several (.txt, .jsonl, and their .gz)")
    p.add_argument("--name", default="", help=f"dataset name under --root (default: {EMBEDDED}, or the input's name)")
    p.add_argument("--root", default="data", help="folder that holds the datasets")
    p.add_argument("--tokenizer", default="", help=f"byte or {', '.join(TIKTOKEN_NAMES)} (default: byte "
                                                   f"for the embedded corpus, gpt2 for --input)")
    p.add_argument("--tiktoken_file", default=None, help="local .tiktoken ranks, for offline machines")
    p.add_argument("--val_fraction", type=float, default=0.02, help="share of documents for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--max_bytes", type=int, default=10_000_000, help="size cap of the embedded corpus")
    p.add_argument("--txt_split", choices=("file", "blank_line"), default="file",
                   help="a .txt file is one document, or one per block between empty lines")
    p.add_argument("--text_field", default="text", help="the JSON Lines field holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val_fraction={args.val_fraction} must be between 0 and 1")
    args.tokenizer = args.tokenizer or ("gpt2" if args.input else "byte")
    args.name = args.name or (Path(args.input[0].rstrip("/*")).stem if args.input else EMBEDDED)
    return args


def main(argv):
    args = parse_args(argv)
    out_dir = os.path.join(args.root, args.name)
    files = expand_inputs(args.input) if args.input else stdlib_files(args.max_bytes)
    recipe = fingerprint(args, files)
    if os.path.exists(out_dir) and not args.overwrite:
        if os.path.exists(os.path.join(out_dir, "meta.json")) and read_meta(out_dir).get("recipe") == recipe:
            print(f"{out_dir} is up to date (same files and options); --overwrite rebuilds it")
            return
        raise DataError(f"{out_dir} already holds a different dataset: pass --overwrite to replace it, "
                        f"or choose another --name")
    tok = get_tokenizer(args.tokenizer, args.tiktoken_file)
    counts, t0 = Counts(), time.time()
    tmp, sizes, docs, dtype = write_dataset(out_dir, files, tok, args, counts)
    check_splits(docs, tmp)
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "dtype": dtype,
            "train_tokens": sizes["train"], "val_tokens": sizes["val"], "train_documents": docs["train"],
            "val_documents": docs["val"], "source": args.input or [f"{EMBEDDED}: Python {sys.version.split()[0]}"],
            "val_fraction": args.val_fraction, "seed": args.seed, "txt_split": args.txt_split,
            "empty_documents": counts.empty, "unreadable_files": counts.unreadable,
            "replaced_bytes": counts.replaced_bytes, "recipe": recipe}
    finish(out_dir, tmp, meta)
    total = sizes["train"] + sizes["val"]
    print(f"wrote {out_dir}: {counts.documents:,} documents ({docs['train']:,} train / {docs['val']:,} val), "
          f"{sizes['train']:,} train + {sizes['val']:,} val tokens ({tok.name}, {dtype}), "
          f"{counts.bytes / max(total, 1):.2f} bytes/token, {time.time() - t0:.1f} s; skipped {counts.empty} "
          f"empty documents and {counts.unreadable} unreadable files; {counts.replaced_bytes} invalid UTF-8 "
          f"bytes replaced")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:
        sys.exit(f"error: {e}")
