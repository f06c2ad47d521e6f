"""The parameter-golf token shard format, read and written with numpy only (no torch).

A shard is 256 little-endian int32 header words (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16. The data tools (data/*.py) and the tests read and
write shards only through this module; train_gpt.py stays one self-contained file with its own
reader (train_gpt.open_shard), and tests/test_data_tools.py checks that the two agree.

    from data.shards import read_shard, write_shard
    write_shard("fineweb_val_000000.bin", tokens)    # atomic: a temporary file, then a rename
    tokens = read_shard("fineweb_val_000000.bin")    # read-only memmap after header and size checks

CaseOps data adds a byte sidecar beside each val shard: fineweb_val_bytes_NNNNNN.bin, a shard of the
same format and length whose entry i is the number of ORIGINAL UTF-8 bytes that token i of
fineweb_val_NNNNNN.bin stands for (BOS and operator tokens 0). Note the glob trap: fineweb_val_*.bin
also matches the sidecars; token_shards() leaves them out, read_sidecar() pairs and checks them.

    for path in token_shards(folder, "val"):
        tokens, nbytes = read_shard(path), read_sidecar(path)   # same length, or ShardError

Every error is a ShardError (a ValueError) whose message is one line naming the file.
"""
import os
import tempfile
from pathlib import Path

import numpy as np

MAGIC, VERSION = 20240520, 1
HEADER_WORDS = 256
HEADER_BYTES = 4 * HEADER_WORDS
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKENS = 2**31 - 1  # the header stores the count as int32


class ShardError(ValueError):
    """A file that is not a valid shard, or tokens that do not fit one; the message names the file."""


def header(n_tokens: int) -> bytes:
    words = np.zeros(HEADER_WORDS, dtype="<i4")
    words[:3] = (MAGIC, VERSION, n_tokens)
    return words.tobytes()


def as_tokens(tokens, path="tokens") -> np.ndarray:
    """tokens as a 1-D little-endian uint16 array; ShardError if any is not an integer in [0, 65535]."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"{path}: expected a 1-D token array, got shape {arr.shape}")
    if arr.dtype == TOKEN_DTYPE:
        return arr
    if arr.size == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    if arr.dtype.kind not in "iu":
        raise ShardError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr > np.iinfo(TOKEN_DTYPE).max))
    if len(bad):
        raise ShardError(f"{path}: token {arr[bad[0]]} at offset {bad[0]} does not fit uint16 (0..65535)")
    return arr.astype(TOKEN_DTYPE)


def write_shard(path, tokens) -> int:
    """Write tokens as one shard at path (a temporary file in the same folder, renamed into place, so a
    reader never sees a partial shard). Returns the number of tokens written."""
    path = Path(path)
    toks = as_tokens(tokens, path)
    if len(toks) > MAX_TOKENS:
        raise ShardError(f"{path}: {len(toks)} tokens, at most {MAX_TOKENS} fit one shard")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header(len(toks)))
            f.write(toks.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(toks)


def read_header(path) -> int:
    """The token count of a valid shard (header and exact file size checked); ShardError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: not a shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    magic, version, n = (int(x) for x in np.frombuffer(head, dtype="<i4", count=3))
    if magic != MAGIC:
        raise ShardError(f"{path}: not a shard (magic {magic}, expected {MAGIC})")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {VERSION})")
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: {size} bytes, expected {HEADER_BYTES + 2 * max(n, 0)} for the {n} tokens "
                         f"its header counts (truncated or corrupt)")
    return n


def read_shard(path) -> np.ndarray:
    """The tokens of a valid shard as a read-only little-endian uint16 memmap (an empty array for 0 tokens)."""
    n = read_header(path)
    if n == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def is_sidecar(path) -> bool:
    """True for a byte sidecar (fineweb_val_bytes_NNNNNN.bin), which token-shard globs also match."""
    return "_bytes_" in Path(path).name


def sidecar_path(token_shard) -> Path:
    """The byte sidecar beside a token shard: fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin."""
    path = Path(token_shard)
    prefix, _, index = path.stem.rpartition("_")
    return path.with_name(f"{prefix}_bytes_{index}{path.suffix}")


def token_shards(folder, split: str) -> list:
    """The token shards folder/fineweb_{split}_*.bin in order, without byte sidecars."""
    return sorted(p for p in Path(folder).glob(f"fineweb_{split}_*.bin") if not is_sidecar(p))


def read_sidecar(token_shard) -> np.ndarray:
    """The byte counts of a token shard's sidecar (a memmap like read_shard), after checking that both
    are valid shards of the same length; ShardError (one line) otherwise."""
    side = sidecar_path(token_shard)
    n = read_header(token_shard)
    if not side.is_file():
        raise ShardError(f"{side}: missing, the byte sidecar of {Path(token_shard).name}")
    m = read_header(side)
    if m != n:
        raise ShardError(f"{side}: {m} byte counts, but its token shard {Path(token_shard).name} has {n} tokens")
    return read_shard(side)


class ShardWriter:
    """Cuts a token stream into shards of at most `cap` tokens: folder/{prefix}_000000.bin, _000001, ...
    Each shard is written under a temporary name and renamed when complete (on reaching cap, or on
    close()). `files` lists the names written, `tokens` counts the tokens."""

    def __init__(self, folder, prefix: str, cap: int):
        if not 1 <= cap <= MAX_TOKENS:
            raise ShardError(f"{folder}: shard size {cap} tokens, expected 1..{MAX_TOKENS}")
        self.folder, self.prefix, self.cap = Path(folder), prefix, cap
        self.files, self.tokens = [], 0
        self._f, self._tmp, self._fill = None, None, 0

    def write(self, tokens) -> None:
        toks = as_tokens(tokens, self.folder / f"{self.prefix}_*.bin")
        while len(toks):
            if self._f is None:
                self.files.append(f"{self.prefix}_{len(self.files):06d}.bin")
                fd, self._tmp = tempfile.mkstemp(prefix=f".{self.files[-1]}.", suffix=".tmp", dir=self.folder)
                self._f, self._fill = os.fdopen(fd, "wb"), 0
                self._f.write(bytes(HEADER_BYTES))  # filled in when the shard is complete
            k = min(len(toks), self.cap - self._fill)
            self._f.write(toks[:k].tobytes())
            self._fill, self.tokens, toks = self._fill + k, self.tokens + k, toks[k:]
            if self._fill == self.cap:
                self.close()

    def close(self) -> None:
        """Complete the current shard (if any) and rename it into place."""
        if self._f is not None:
            self._f.seek(0)
            self._f.write(header(self._fill))
            self._f.close()
            os.replace(self._tmp, self.folder / self.files[-1])
            self._f = self._tmp = None

    def discard(self) -> None:
        """Drop an unfinished shard (after a failure)."""
        if self._f is not None:
            self._f.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._f = self._tmp = None
