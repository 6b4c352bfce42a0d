"""The rANS coder under Gaussian models (cdcca.entropy): exact round trips in mixed contexts, a code length within
a few hundredths of a bit of the model's entropy, every symbol codable, tables both ends can compare, and streams
that do not decode exactly rejected."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca import entropy
from cdcca.dwc_format import ecdq_dither


def _dithered(sigma: float, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(symbols round(x + u), dither u) for x ~ N(0, σ²)."""
    dither = ecdq_dither(n, seed)
    return np.rint(np.random.default_rng(seed).normal(0.0, sigma, n) + dither).astype(np.int64), dither


@given(st.lists(st.tuples(st.integers(-127, 127), st.integers(0, 63), st.integers(0, 3)), max_size=60))
@settings(max_examples=60, deadline=None)
def test_any_symbols_in_any_contexts_round_trip_exactly(items):
    symbols, scales, bins = (np.array(column, np.int64) for column in zip(*items)) if items else ([], [], [])

    data = entropy.encode(np.asarray(symbols), np.asarray(scales), np.asarray(bins), entropy.GaussianModel())
    decoded = entropy.decode(data, np.asarray(scales), np.asarray(bins), entropy.GaussianModel())

    np.testing.assert_array_equal(decoded, np.asarray(symbols, np.int16))


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.66])
def test_code_length_is_within_a_few_hundredths_of_a_bit_of_the_gaussian_entropy(sigma):
    symbols, dither = _dithered(sigma, 20000)
    scales = np.full(symbols.size, entropy.scale_class(np.array([sigma]))[0])

    data = entropy.encode(symbols, scales, entropy.dither_bin(dither), entropy.GaussianModel())

    bits = 8 * len(data) / symbols.size
    cdf = lambda t: 0.5 * math.erfc(-t / (sigma * math.sqrt(2.0)))  # noqa: E731
    ideal = float(np.mean([-math.log2(cdf(k + 0.5 - u) - cdf(k - 0.5 - u)) for k, u in zip(symbols, dither)]))
    assert ideal - 0.02 < bits < ideal + 0.03  # P(s | u) exactly, against four dither bins and 16-bit tables
    assert bits < 0.5 * math.log2(2 * math.pi * math.e * (sigma**2 + 1 / 12)) + 0.03  # below H(s), given u
    zstd_bits = 8 * len(zstandard.ZstdCompressor(level=19).compress(symbols.astype(np.int8).tobytes())) / symbols.size
    assert bits < zstd_bits  # zstd learns its Huffman table from these 20 k symbols; on 16 it cannot


def test_a_symbol_the_model_thinks_impossible_still_codes():
    symbols = np.array([127, -127, 0, 90])
    scales, bins = np.zeros(4, np.int64), np.zeros(4, np.int64)  # σ = 2^-6: ±127 sit far beyond the tails

    data = entropy.encode(symbols, scales, bins, entropy.GaussianModel())

    np.testing.assert_array_equal(entropy.decode(data, scales, bins, entropy.GaussianModel()), symbols)
    assert len(data) < 4 + 3 * 2 + 2  # each tail symbol costs at most its 16 bits of frequency 1


def test_frequencies_sum_to_the_total_keep_every_symbol_and_follow_the_offset():
    centred = entropy.gaussian_frequencies(2.0, 0.0)
    shifted = entropy.gaussian_frequencies(2.0, 0.375)

    assert centred.sum() == shifted.sum() == entropy.TOTAL and centred.min() >= 1 and centred.size == entropy.ALPHABET
    assert int(np.argmax(centred)) == entropy.MAX_SYMBOL  # mode at 0
    np.testing.assert_allclose(centred[:-1][::-1], centred[1:], atol=1)  # symmetric around 0 (but the mode's fix)
    assert shifted[entropy.MAX_SYMBOL + 1] > shifted[entropy.MAX_SYMBOL - 1]  # x + u leans towards the dither's sign


def test_scale_classes_are_quarter_octaves_and_clamped():
    sigma = np.array([2.0, 2.1, 1e-9, 1e9])
    classes = entropy.scale_class(sigma)

    assert entropy.class_scale(int(classes[0])) == 2.0
    assert abs(math.log2(entropy.class_scale(int(classes[1])) / 2.1)) <= 1 / 8
    assert (classes[2], classes[3]) == (0, entropy.SCALE_CLASSES - 1)


def test_checksum_tells_tables_apart():
    model = entropy.GaussianModel()
    scales, bins = np.array([28, 28, 30]), np.array([0, 3, 1])

    fresh = entropy.GaussianModel()
    assert model.checksum(scales, bins) == fresh.checksum(np.tile(scales[::-1], 2), np.tile(bins[::-1], 2))
    assert model.checksum(scales, bins) != model.checksum(scales[:2], bins[:2])


def test_truncated_extended_or_foreign_streams_are_rejected():
    symbols, dither = _dithered(2.0, 500)
    scales, bins = np.full(500, 28), entropy.dither_bin(dither)
    data = entropy.encode(symbols, scales, bins, entropy.GaussianModel())

    for bad in (data[:-1], data + b"\x00", data[:3], b""):
        with pytest.raises(entropy.EntropyError):
            entropy.decode(bad, scales, bins, entropy.GaussianModel())
    with pytest.raises(entropy.EntropyError):
        entropy.decode(data, np.full(500, 40), bins, entropy.GaussianModel())  # another scale's model
    with pytest.raises(entropy.EntropyError, match="±127"):
        entropy.encode(np.array([128]), np.array([28]), np.array([0]), entropy.GaussianModel())


@pytest.mark.parametrize(("scale", "bin_"), [(0, 0), (24, 1), (31, 3), (63, 2)])
def test_a_contexts_slot_lookup_names_the_symbol_whose_interval_holds_the_slot(scale, bin_):
    table = entropy.context_table(scale, bin_)
    starts = np.asarray(table.starts)
    slots = np.arange(entropy.TOTAL)
    assert len(table.symbols) == entropy.TOTAL
    np.testing.assert_array_equal(np.frombuffer(table.symbols, np.uint8), np.searchsorted(starts, slots, "right") - 1)
    assert np.frombuffer(table.freq_bytes, np.int64).tolist() == table.freqs
    assert entropy.context_table(scale, bin_) is table  # built once, then shared by every payload
