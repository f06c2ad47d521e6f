"""The artifact's rANS coder: exact round trips, a size at the histogram's entropy, corrupted streams refused,
and in the artifact: which fields it codes, what they cost against brotli, version-1 artifacts still read."""
import struct

import brotli
import numpy as np
import pytest
import torch

import train_gpt

LANES = train_gpt.RANS_MAX_LANES
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
    """A version-1 artifact is today's brotli-only layout without the rANS section's length."""
    q = gptq_state()
    v2 = train_gpt.pack_artifact(q, {"x": 1}, "brotli")
    magic = len(train_gpt.ARTIFACT_MAGIC)
    version, n_streams, rans_len = struct.unpack("<III", v2[magic:magic + 12])
    assert (version, rans_len) == (2, 0)
    v1 = v2[:magic] + struct.pack("<II", 1, n_streams) + v2[magic + 12:]
    back, config = train_gpt.unpack_artifact(v1)
    assert config == {"x": 1} and torch.equal(back["qo_bank"]["q"], q["qo_bank"]["q"])
