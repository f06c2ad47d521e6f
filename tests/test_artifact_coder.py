"""The artifact's rANS coder: exact round trips, a size at the histogram's entropy, corrupted streams refused,
and in the artifact: which fields it codes, what they cost against brotli, version-1 artifacts still read."""
import hashlib
import json
import re
import struct
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

import train_gpt

LANES = train_gpt.RANS_MAX_LANES
FIXTURES = Path(__file__).parent / "fixtures"
LANE = train_gpt.RANS_LANE_SYMBOLS


def gptq_like_codes(n, seed=0, std=8.0, qmax=31):
    """int6 codes as SDClip leaves them: a rounded Gaussian clipped at +-qmax, as bytes."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal(0, std, n)), -qmax, qmax).astype(np.int8).view(np.uint8)


def entropy_bytes(symbols):
    counts = np.bincount(symbols, minlength=256)
    p = counts[counts > 0] / len(symbols)
    return -(counts[counts > 0] * np.log2(p)).sum() / 8


@pytest.mark.parametrize("n", [1, 1000, LANE, LANE + 1, 5 * LANE + 17, LANES * LANE + 3])
def test_round_trip_at_lane_boundaries(n):
    s = gptq_like_codes(n)
    freq = train_gpt.rans_frequencies(s)
    assert np.array_equal(train_gpt.rans_decode(train_gpt.rans_encode(s, freq), freq, n), s)


def test_round_trip_of_every_byte_value_rare_values_and_one_value():
    rng = np.random.default_rng(1)
    skewed = np.concatenate([np.zeros(200_000, np.uint8), np.arange(256, dtype=np.uint8)])  # 255 values seen once
    for s in (rng.integers(0, 256, 100_000, dtype=np.uint8), rng.permutation(skewed), np.full(3000, 7, np.uint8)):
        freq = train_gpt.rans_frequencies(s)
        assert int(freq.sum()) == 1 << train_gpt.RANS_PRECISION and (freq[np.unique(s)] >= 1).all()
        assert np.array_equal(train_gpt.rans_decode(train_gpt.rans_encode(s, freq), freq, len(s)), s)


def test_size_is_the_entropy_and_under_brotli():
    """What the coder is for: within 0.5% (+ the lanes' states) of the codes' order-0 entropy, where
    brotli-11 on the same bytes is well above it."""
    s = gptq_like_codes(1_000_000)
    coded = len(train_gpt.rans_encode(s, train_gpt.rans_frequencies(s)))
    h = entropy_bytes(s)
    assert h < coded < 1.001 * h + 4 * train_gpt.rans_lanes(len(s)), (coded, h)
    assert coded < len(brotli.compress(s.tobytes(), quality=11)) - 0.005 * h


def test_corrupted_streams_are_refused():
    s = gptq_like_codes(20 * LANE)
    freq = train_gpt.rans_frequencies(s)
    data = train_gpt.rans_encode(s, freq)
    flipped = data[:-100] + bytes([data[-100] ^ 0x5A]) + data[-99:]
    bad_freq = freq.copy()
    bad_freq[np.argmax(freq)] -= 1
    for stream, f, match in [(data[:-2], freq, "ends early|does not end"), (data + b"\0\0", freq, "does not end"),
                             (flipped, freq, "ends early|does not end"), (data, bad_freq, "bad rANS"),
                             (data[:4 * 20 - 4], freq, "bad rANS")]:
        with pytest.raises(ValueError, match=match):
            train_gpt.rans_decode(stream, f, len(s))


def gptq_state(seed=0):
    torch.manual_seed(seed)
    state = {"qo_bank": torch.randn(4, 128, 256), "tok_emb.weight": torch.randn(1024, 128), "g": torch.randn(8)}
    return train_gpt.quantize_state(state, None, 2, 6, 12.85, 7, 14.0)


def test_artifact_codes_the_int6_matrices_only_and_reads_back_bit_identical():
    q = gptq_state()
    blobs = {coder: train_gpt.pack_artifact(q, {"x": 1}, coder) for coder in ("rans", "brotli")}
    for coder, blob in blobs.items():
        back, config = train_gpt.unpack_artifact(blob)
        assert config == {"x": 1} and back.keys() == q.keys()
        for name, entry in q.items():
            assert back[name]["kind"] == entry["kind"]
            for field, t in entry.items():
                if field != "kind":
                    assert back[name][field].dtype == t.dtype and torch.equal(back[name][field], t), (coder, name, field)
    assert [train_gpt.rans_coded(e["kind"], f) for e in q.values() for f in e if f != "kind"] == [
        True, False, False, False, False]  # qo_bank.q only: not its scales, not the int7 embedding, not fp16
    assert len(blobs["rans"]) < len(blobs["brotli"])


def test_version_1_artifacts_still_read():
    """tests/fixtures/artifact_v1.br was written by the brotli-only code before the coder (e058cfb)."""
    back, config = train_gpt.unpack_artifact((FIXTURES / "artifact_v1.br").read_bytes())
    assert config == {"model": {}, "x": 1}
    assert np.array_equal(back["m"]["q"].numpy(), ((np.arange(512) * 7) % 63 - 31).reshape(4, 8, 16))
    assert np.array_equal(back["m"]["scale"].numpy(), (np.arange(32, dtype=np.float16) / 64 + 0.01).reshape(4, 8))
    assert back["m"]["kind"] == "int6_rows" and torch.equal(back["g"]["w"], torch.arange(8, dtype=torch.float16))


def forged(blob: bytes, edit, pad: int = 0) -> bytes:
    """The artifact (version 1 or 2, one brotli stream) with its JSON header changed by edit(meta) and `pad` zero
    bytes after its data, under a checksum that matches again: what only a deliberate forgery gets past the
    sha256 with."""
    magic = len(train_gpt.ARTIFACT_MAGIC)
    version, n_streams = struct.unpack("<II", blob[magic:magic + 8])
    rans_len = struct.unpack("<I", blob[magic + 8:magic + 12])[0] if version == 2 else 0
    head = magic + (12 if version == 2 else 8)
    assert n_streams == 1
    size = struct.unpack("<I", blob[head:head + 4])[0]
    body = brotli.decompress(blob[head + 36:head + 36 + size])
    (hlen,) = struct.unpack("<I", body[:4])
    meta = json.loads(body[4:4 + hlen])
    edit(meta)
    header = json.dumps(meta).encode()
    stream = brotli.compress(struct.pack("<I", len(header)) + header + body[4 + hlen:] + bytes(pad), quality=1)
    payload = stream + blob[len(blob) - rans_len:]
    lengths = struct.pack("<III", version, 1, rans_len) if version == 2 else struct.pack("<II", version, 1)
    return blob[:magic] + lengths + struct.pack("<I", len(stream)) + hashlib.sha256(payload).digest() + payload


@pytest.fixture(scope="module")
def small_artifact():
    return train_gpt.pack_artifact(gptq_state(), {"x": 1})


def set_entry(field, value, coded=True):
    def edit(meta):
        next(e for e in meta["tensors"] if ("coder" in e) == coded)[field] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(rans_freq=[2 ** 62] * 4 + [65536] + [0] * 251),  # sums to 2^16 mod 2^64
     "corrupted or truncated artifact (rANS: bad rANS frequencies"),
    (lambda m: m.update(rans_freq=[256.5] * 256), "corrupted or truncated artifact (its rANS header holds other than"),
    (lambda m: m.update(rans_symbols=2_000_000_000), "corrupted or truncated artifact (its tensor table does not cover"),
    (lambda m: m.pop("config"), "corrupted or truncated artifact (its config is not a mapping"),
    (lambda m: m.update(config=[1]), "corrupted or truncated artifact (its config is not a mapping"),
    (lambda m: m.update(config={"model": [1]}), "corrupted or truncated artifact (its config is not a mapping"),
    (lambda m: m.update(tensors={"a": 1}), "corrupted tensor table entry a: unknown fields"),
    (set_entry("offset", -4), "integers >= 0"),
    (set_entry("shape", [2.0, 2]), "integers >= 0"),
    (set_entry("shape", [0, 2 ** 63], coded=False), "integers >= 0"),
    (set_entry("shape", "ab"), "unknown fields"),
    (set_entry("shape", [1] * 9), "unknown fields"),
    (set_entry("name", ["a"]), "unknown fields"),
    (set_entry("dtype", ["int8"]), "unknown fields"),
    (set_entry("offset", True), "integers >= 0"),
    (set_entry("nbytes", 5), "does not fit"),
    (set_entry("offset", 10 ** 9, coded=False), "does not fit"),
    (set_entry("coder", "zstd", coded=True), "unknown fields"),
    (set_entry("dtype", "float16"), "does not fit"),
])
def test_a_forged_header_is_a_clear_error(edit, message, small_artifact):
    blob = small_artifact
    assert train_gpt.unpack_artifact(forged(blob, lambda meta: None))[1] == {"x": 1}  # the forger itself is sound
    with pytest.raises(train_gpt.UserError, match=re.escape(message)):
        train_gpt.unpack_artifact(forged(blob, edit))


def test_a_forged_version_1_header_and_an_oversized_stream_are_clear_errors(small_artifact):
    """The checks hold for version-1 artifacts too; a brotli stream that inflates past what pack_artifact ever
    writes in one (COMPRESS_CHUNK_BYTES) is refused before it takes the memory it asks for."""
    v1 = (FIXTURES / "artifact_v1.br").read_bytes()
    assert train_gpt.unpack_artifact(forged(v1, lambda meta: None))[1] == {"model": {}, "x": 1}
    with pytest.raises(train_gpt.UserError, match="corrupted tensor table entry m: offset, size and shape"):
        train_gpt.unpack_artifact(forged(v1, set_entry("shape", [4.0, 8, 16], coded=False)))
    bomb = forged(small_artifact, lambda meta: None, pad=train_gpt.COMPRESS_CHUNK_BYTES)
    assert len(bomb) < len(small_artifact) + 10_000
    with pytest.raises(train_gpt.UserError, match="corrupted or truncated"):
        train_gpt.unpack_artifact(bomb)


def test_symbol_count_is_bounded_and_awq_fields_without_row_scales_are_refused():
    """A stream of one value reads no words, so only the bound stops a forged count from decoding (and allocating)
    for as long as it says; AWQ fields on an entry without its row scales are a problem, not a KeyError."""
    one = np.zeros(256, np.uint64)
    one[0] = 1 << train_gpt.RANS_PRECISION

    def start_states(n):  # the whole stream of n symbols of one value: every lane's state, untouched
        return np.full(train_gpt.rans_lanes(n), train_gpt.RANS_LOW, "<u4").tobytes()
    n = 3 * LANE + 5
    assert np.array_equal(train_gpt.rans_decode(start_states(n), one, n), np.zeros(n, np.uint8))
    n = train_gpt.RANS_MAX_SYMBOLS + 1
    with pytest.raises(ValueError, match="symbol count"):
        train_gpt.rans_decode(start_states(n), one, n)
    q = torch.zeros(2, 8, 16, dtype=torch.int8)
    entry = {"q": q, "awq.cols": torch.zeros(2, 16, dtype=torch.int8), "awq.scale": torch.zeros(2, 8, dtype=torch.float16)}
    assert "belong together" in train_gpt.awq_problem(entry)


def test_awq_values_and_one_value_over_many_lanes_round_trip():
    """AWQ-lite puts int8-grid codes (beyond +-31) into an int6 matrix's codes; a stream of one value takes no
    words at all and must still come back at its length over many lanes."""
    s = gptq_like_codes(300_000)
    s[::997] = np.array([-120, 127, 90], np.int8).view(np.uint8)[np.arange(len(s[::997])) % 3]
    for symbols in (s, np.full(40 * LANE + 5, 3, np.uint8)):
        freq = train_gpt.rans_frequencies(symbols)
        assert np.array_equal(train_gpt.rans_decode(train_gpt.rans_encode(symbols, freq), freq, len(symbols)), symbols)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q["qo_bank"].update(scale=q["qo_bank"]["scale"][0]), "a float16 scale per row"),  # broadcast silently
    (lambda q: q["qo_bank"].update(scale=q["qo_bank"]["scale"].to(torch.int8)), "a float16 scale per row"),
    (lambda q: q["qo_bank"].pop("scale"), "a float16 scale per row"),
    (lambda q: q["qo_bank"].update(extra=torch.zeros(2, dtype=torch.float16)), "unknown fields"),
    (lambda q: q["g"].update(w=q["g"]["w"].to(torch.int8)), "one float16 w"),
    (lambda q: q["g"].update(q=torch.zeros(2, 2, dtype=torch.int8)), "one float16 w"),
    (lambda q: q["g"].update(kind="int9_rows"), "unknown kind"),
])
def test_an_entry_whose_fields_disagree_is_refused(edit, message):
    """Each entry's fields are checked against each other and its kind: a written-wrong or forged file is an
    error, not a model that loads differently (a scale of the wrong shape broadcast without complaint)."""
    q = gptq_state()
    train_gpt.unpack_artifact(train_gpt.pack_artifact(q, {}))  # sound as written
    edit(q)
    with pytest.raises(train_gpt.UserError, match=f"corrupted entry .*{message}"):
        train_gpt.unpack_artifact(train_gpt.pack_artifact(q, {}))


def test_a_table_row_twice_or_an_entry_of_two_kinds_is_refused(small_artifact):
    """Rows over the same bytes (each copied: a small file could ask for any memory) are refused before anything is
    decoded; rows over their own bytes that name one field twice, or one entry with two kinds, after."""
    def copied(meta):
        meta["tensors"].append(dict(meta["tensors"][0]))

    def renamed(**fields):
        def edit(meta):
            first, other = meta["tensors"][0], meta["tensors"][1]
            other.update({k: first[k] if v is None else v for k, v in fields.items()})
        return edit
    with pytest.raises(train_gpt.UserError, match=re.escape("its tensor table does not cover its data exactly once")):
        train_gpt.unpack_artifact(forged(small_artifact, copied))
    for edit in (renamed(name=None, field=None, kind=None), renamed(name=None, field="other", kind="fp16")):
        with pytest.raises(train_gpt.UserError, match="a field twice, or two kinds"):
            train_gpt.unpack_artifact(forged(small_artifact, edit))


def test_more_streams_than_any_artifact_needs_are_refused_before_inflating(small_artifact, monkeypatch):
    """Each brotli stream may inflate to a whole chunk from a few bytes: their count is bounded before any is read
    (a few kB of streams asked for GBs). The same artifact in fewer streams reads back."""
    monkeypatch.setattr(train_gpt, "COMPRESS_CHUNK_BYTES", 64)  # small_artifact's body in > 64 pieces
    many = train_gpt.pack_artifact(gptq_state(), {"x": 1})
    monkeypatch.setattr(train_gpt, "ARTIFACT_MAX_STREAMS", 1 << 20)
    assert train_gpt.unpack_artifact(many)[1] == {"x": 1}
    monkeypatch.setattr(train_gpt, "ARTIFACT_MAX_STREAMS", 64)
    with pytest.raises(train_gpt.UserError, match=r"corrupted or truncated artifact \(\d+ brotli streams, more than 64\)"):
        train_gpt.unpack_artifact(many)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_an_empty_gptq_matrix_is_a_corrupted_entry(shape):
    """A GPTQ'd matrix is never empty; with LQER fields beside it, its slices were a division by zero."""
    entry = {"kind": "int6_rows", "q": torch.zeros(shape, dtype=torch.int8),
             "scale": torch.zeros(shape[0], dtype=torch.float16)}
    for f in ("a", "b"):
        entry[f"lqer0.{f}"], entry[f"lqer0.{f}_scale"] = torch.zeros(1, 1, dtype=torch.int8), torch.ones(1, dtype=torch.float16)
    with pytest.raises(train_gpt.UserError, match="corrupted entry m: a GPTQ'd matrix holds int8 codes"):
        train_gpt.unpack_artifact(train_gpt.pack_artifact({"m": entry}, {}))
