"""
The tokenizers every script shares (prepare_data.py writes datasets with them, sample.py and the tasks decode and
encode with them, hf.py exports them): UTF-8 bytes, tiktoken's gpt2 / cl100k_base / o200k_base (gpt2 offline from a
rank file), and hf:PATH, a checkpoint's tokenizer.json through the `tokenizers` library. One small interface:
name, vocab_size, eot_token (the id before every document), eot_source, encode, encode_array, decode.

    tok = get_tokenizer("gpt2", tiktoken_file="gpt2.tiktoken")   # TokenizerError says what to do when it cannot
"""
import contextlib
import importlib
import json
import urllib.parse
from pathlib import Path

import numpy as np

TOKENIZERS = ("byte", "gpt2", "cl100k_base", "o200k_base")
# sha256 of GPT-2's ranks (tiktoken's r50k_base.tiktoken): a wrong --tiktoken_file is refused, not used.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class TokenizerError(Exception):
    """A tokenizer that cannot be built (a missing package or file, no network): one line that says what to do."""


def need(module: str, purpose: str, error=TokenizerError):
    """Import a package (tiktoken, tokenizers; prepare_data.py's optional formats), or raise `error` saying how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise error(f"{purpose} needs the package {package}: pip install {package}") from None


class TiktokenTokenizer:
    """A tiktoken Encoding seen through the small interface that train.py, sample.py and the tests use."""

    def __init__(self, name: str, encoding):
        self.name, self.encoding = name, encoding
        self.vocab_size, self.eot_token = encoding.n_vocab, encoding.eot_token
        self.eot_source = "<|endoftext|>, the special token that tiktoken's encodings end a text with"

    def encode(self, text: str) -> list[int]:
        # Ordinary: a document that contains the text "<|endoftext|>" must not produce the real eot id.
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # encode()'s ids (special tokens are plain text) straight into a uint32 array: ~15% faster than a list.
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


class HFTokenizer:
    """A checkpoint's tokenizer.json, through the tokenizers library, behind TiktokenTokenizer's interface. The id
    that precedes each document (eot_token) is the tokenizer's BOS, which it puts before a text itself (Llama,
    SmolLM), so every document starts as the model saw documents start; without a BOS (Qwen2), its EOS, the id that
    ends each document in such models' pre-training stream."""

    def __init__(self, path: str):
        tokenizers = need("tokenizers", "an hf:PATH tokenizer")
        folder = Path(path).parent if Path(path).is_file() else Path(path)
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # a missing file or one tokenizers cannot parse: both are the path's fault
            raise TokenizerError(f"cannot read the tokenizer hf:{path} ({str(err).splitlines()[0][:120]}): give a "
                               "model folder holding tokenizer.json, or that file") from None
        if hasattr(self.tokenizer, "encode_special_tokens"):  # "<|endoftext|>" in a document stays text (tiktoken's
            self.tokenizer.encode_special_tokens = True  # encode_ordinary); tokenizers < 0.15 lack the switch
        self.name, self.vocab_size = f"hf:{folder.resolve()}", self.tokenizer.get_vocab_size(with_added_tokens=True)
        specials = {}
        for file in ("config.json", "tokenizer_config.json"):  # ids in config.json, token strings in the other
            with contextlib.suppress(OSError, ValueError):
                for kind, value in json.loads((folder / file).read_text()).items():
                    value = value.get("content") if isinstance(value, dict) else value  # (an AddedToken dict)
                    token_id = self.tokenizer.token_to_id(value) if isinstance(value, str) else value
                    if kind in ("bos_token", "eos_token", "bos_token_id", "eos_token_id") and isinstance(token_id, int):
                        specials[kind[:3]] = token_id
        if not specials:
            raise TokenizerError(f"hf:{path} names no BOS or EOS token (bos_token / eos_token in tokenizer_config.json, "
                               "bos_token_id / eos_token_id in config.json): documents need a separator")
        kind = "bos" if "bos" in specials else "eos"
        self.eot_token = specials[kind]
        self.eot_source = f"{kind}_token {self.tokenizer.id_to_token(self.eot_token)!r}: " + (
            "the BOS, so each document starts as documents start in the model's pre-training" if kind == "bos" else
            "the EOS, as the tokenizer names no BOS: it separates documents in such models' pre-training")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tiktoken_encoding(tiktoken, name: str):
    """tiktoken's encoding `name`: from its cache, else downloaded if the host answers within seconds. (Left to
    itself, tiktoken retries an unreachable host for ~50 s before it fails.)"""
    load = importlib.import_module("tiktoken.load")
    fetch, missing = load.read_file, []

    def cache_only(blobpath):
        missing.append(blobpath)
        raise ConnectionError(f"{blobpath} is not in tiktoken's cache")
    load.read_file = cache_only
    try:
        return tiktoken.get_encoding(name)
    except ConnectionError:
        pass
    finally:
        load.read_file = fetch
    if not reachable(urllib.parse.urlsplit(missing[0]).hostname):
        raise ConnectionError(f"cannot reach {missing[0]}")
    return tiktoken.get_encoding(name)


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether host accepts a connection on port 443 within timeout seconds, name lookup included (which a socket
    timeout does not bound: a thread does)."""
    import socket
    import threading
    answered = []

    def connect():
        with contextlib.suppress(OSError), socket.create_connection((host, 443), timeout=timeout):
            answered.append(True)
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


def get_tokenizer(name: str, tiktoken_file: str | None = None):
    """The tokenizer called `name` (a TiktokenTokenizer, or an HFTokenizer for hf:PATH); gpt2 with tiktoken_file reads
    its BPE ranks from that file, offline. Its errors name only --tiktoken_file, an option of every caller."""
    if tiktoken_file is not None and name != "gpt2":  # tiktoken builds cl100k_base, o200k_base from downloads only
        raise TokenizerError(f"--tiktoken_file builds the gpt2 tokenizer only: leave it out for {name}")
    if name.startswith("hf:"):
        return HFTokenizer(name[3:])
    if name not in TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)} or hf:PATH")
    tiktoken = need("tiktoken", "tokenizing")
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    if name == "byte":  # UTF-8 bytes as ids 0..255, eot 256: ranks for the 256 single bytes and no merge
        # (any split of the text gives the same ids; pieces of <= 64 characters are the fastest, ~30 MB/s)
        ranks, pattern = {bytes([i]): i for i in range(256)}, r"[\s\S]{1,64}"
    elif tiktoken_file is None:
        try:
            return TiktokenTokenizer(name, tiktoken_encoding(tiktoken, name))
        except Exception as err:  # requests/urllib/OS errors all mean the same thing to the user
            fix = ("pass --tiktoken_file=PATH/gpt2.tiktoken, a copy of its ranks" if name == "gpt2" else
                   "run once online so that tiktoken caches them (TIKTOKEN_CACHE_DIR), or use gpt2 tokens")
            raise TokenizerError(f"the {name} tokenizer files could not be fetched ({type(err).__name__}: offline?); "
                               f"{fix}") from None
    else:
        from tiktoken.load import load_tiktoken_bpe
        try:
            ranks, pattern = load_tiktoken_bpe(tiktoken_file, expected_hash=GPT2_RANKS_SHA256), r50k_pat_str
        except OSError as err:
            raise TokenizerError(f"cannot read --tiktoken_file={tiktoken_file}: {err.strerror or err}") from None
        except ValueError:  # tiktoken's hash check
            raise TokenizerError(f"--tiktoken_file={tiktoken_file} is not the gpt2 rank file (sha256 "
                               f"{GPT2_RANKS_SHA256[:12]}...): pass gpt2.tiktoken") from None
    encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)})
    return TiktokenTokenizer(name, encoding)
