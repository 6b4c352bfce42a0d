"""Entropy coding of small signed integers under a parametric model, in numpy and Python integers (torch-free:
the robot decodes with it, :mod:`cdcca.dwc_format`).

The ``subspace`` codec's coefficients come in tensors of a dozen values (median 16 on the tiny student), too few for
an adaptive coder or zstd's Huffman tables to learn their statistics: zstd spends 3.4 bits on a coefficient whose
Gaussian entropy is 3.1. Both ends already know each value's distribution up to one scale per tensor, so a static
model costs nothing to learn: a Gaussian of the tensor's RMS (among all laws of that variance, the Gaussian
model's code length depends on the second moment alone, so a heavier-tailed tensor costs what its RMS says),
conditioned on the value's subtractive dither u, which both ends draw from the seed:
P(s = k | u) = Φ((k + ½ − u)/σ) − Φ((k − ½ − u)/σ) for s = round(x/q + u), x/q ~ N(0, σ²).

The coder is rANS with byte-wise renormalisation (Duda, "Asymmetric numeral systems: entropy coding combining
speed of Huffman coding with compression rate of arithmetic coding", arXiv:1311.2540, 2013; the state bounds of
Giesen's public-domain ``rans_byte.h``): a 31-bit state, 16-bit frequencies, four bytes of final state. Written
here rather than taken from a library because the robot must decode it on ARM without new native wheels (the
``constriction`` package, which has such models, ships no aarch64 wheel), and because a frequency table the two
ends compute differently would decode garbage silently: :meth:`GaussianModel.checksum` lets the receiver check
that its tables are the sender's (``math.erfc`` is the platform's libm, not correctly rounded).
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from cdcca.errors import CdccaError

MAX_SYMBOL = 127  # symbols are integers in [-MAX_SYMBOL, MAX_SYMBOL]
ALPHABET = 2 * MAX_SYMBOL + 1
PRECISION = 16  # frequencies sum to 2^PRECISION; every symbol gets at least 1 (any value stays codable)
TOTAL = 1 << PRECISION
STATE_LOW = 1 << 23  # the state lives in [STATE_LOW, 256 · STATE_LOW) between symbols
STATE_BYTES = 4
DITHER_BINS = 4  # a table per quarter of the dither's range [-1/2, 1/2), built at the bin's centre
SCALE_CLASSES = 64  # σ = 2^((class − SCALE_ORIGIN) / SCALE_PER_OCTAVE), quarter octaves from 2^-6 to 2^9.75
SCALE_ORIGIN = 24
SCALE_PER_OCTAVE = 4


class EntropyError(CdccaError, ValueError):
    """Bytes that do not decode under the given model (truncated, corrupt, or another model's)."""


def scale_class(sigma: np.ndarray) -> np.ndarray:
    """The nearest scale class (uint8) of each σ > 0 (clamped to the grid)."""
    code = np.rint(np.log2(np.maximum(sigma, 1e-30)) * SCALE_PER_OCTAVE) + SCALE_ORIGIN
    return np.clip(code, 0, SCALE_CLASSES - 1).astype(np.uint8)


def class_scale(code: int) -> float:
    """σ of a scale class (an exact power of two times a quarter-octave factor)."""
    return math.ldexp(_QUARTER_OCTAVES[code % SCALE_PER_OCTAVE], code // SCALE_PER_OCTAVE - SCALE_ORIGIN // 4)


_QUARTER_OCTAVES = (1.0, 1.189207115002721, 1.4142135623730951, 1.681792830507429)  # 2^(r/4), as literals


def dither_bin(dither: np.ndarray) -> np.ndarray:
    """The table bin of each dither value u in [-1/2, 1/2)."""
    return np.clip(((dither + 0.5) * DITHER_BINS).astype(np.int64), 0, DITHER_BINS - 1)


def gaussian_frequencies(sigma: float, offset: float) -> np.ndarray:
    """Integer frequencies (int64 (ALPHABET,), sum :data:`TOTAL`, each >= 1) of s = round(x + offset) for
    x ~ N(0, σ²), symbols -MAX_SYMBOL..MAX_SYMBOL in order."""
    edges = [(k - 0.5 - offset) / (sigma * math.sqrt(2.0)) for k in range(-MAX_SYMBOL, MAX_SYMBOL + 2)]
    cdf = np.array([0.5 * math.erfc(-e) for e in edges])  # (ALPHABET + 1,)
    mass = np.diff(cdf)
    mass = mass / mass.sum() if mass.sum() > 0 else np.full(ALPHABET, 1.0 / ALPHABET)
    freq = 1 + np.floor(mass * (TOTAL - ALPHABET)).astype(np.int64)
    freq[int(np.argmax(freq))] += TOTAL - int(freq.sum())
    return freq


class ContextTable(NamedTuple):
    """One context's code: its frequencies and cumulative starts as Python lists (the coder's inner loops read
    them), the symbol index of each of the 2^16 slots (bytes: decoding looks a slot up instead of bisecting the
    starts) and the frequencies as int64 bytes (what :meth:`GaussianModel.checksum` hashes)."""

    freqs: list[int]
    starts: list[int]
    symbols: bytes
    freq_bytes: bytes


@lru_cache(maxsize=64)  # a table is a pure function of its key; a payload uses a few dozen of the 256 contexts
def context_table(scale: int, bin_: int) -> ContextTable:
    """The :class:`ContextTable` of context (scale class, dither bin), built once per process."""
    freq = gaussian_frequencies(class_scale(scale), -0.5 + (bin_ + 0.5) / DITHER_BINS)
    starts = np.concatenate([[0], np.cumsum(freq)[:-1]])
    symbols = np.repeat(np.arange(ALPHABET, dtype=np.uint8), freq).tobytes()  # slot -> symbol index (< 256)
    return ContextTable(freq.tolist(), starts.tolist(), symbols, freq.astype(np.int64).tobytes())


class GaussianModel:
    """The tables of a payload's contexts, context = (scale class, dither bin) (:func:`context_table`)."""

    def table(self, scale: int, bin_: int) -> ContextTable:
        """The table of a context."""
        return context_table(int(scale), int(bin_))

    def per_value(self, scales: np.ndarray, bins: np.ndarray) -> list[ContextTable]:
        """Each value's table, from its scale class and dither bin (each distinct context looked up once)."""
        keys, inverse = _unique_contexts(scales, bins)
        tables = [self.table(*divmod(int(key), DITHER_BINS)) for key in keys]
        return [tables[j] for j in inverse.tolist()]

    def checksum(self, scales: np.ndarray, bins: np.ndarray) -> int:
        """CRC-32 of the tables of the contexts (scale class, dither bin) present, in sorted order: the sender puts
        it in the header and the receiver compares its own before decoding."""
        crc = 0
        for key in _unique_contexts(scales, bins)[0]:
            crc = zlib.crc32(self.table(*divmod(int(key), DITHER_BINS)).freq_bytes, crc)
        return crc


def _unique_contexts(scales: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct context keys scale · DITHER_BINS + bin, each value's index into them)."""
    keys = np.asarray(scales, np.int64) * DITHER_BINS + np.asarray(bins, np.int64)
    return np.unique(keys, return_inverse=True)


def encode(symbols: np.ndarray, scales: np.ndarray, bins: np.ndarray, model: GaussianModel) -> bytes:
    """rANS bytes of ``symbols`` (ints in ±MAX_SYMBOL), each coded in its (scale class, dither bin) context."""
    symbols = np.asarray(symbols, np.int64)
    if symbols.size and np.abs(symbols).max() > MAX_SYMBOL:
        raise EntropyError(f"symbols must lie in ±{MAX_SYMBOL}")
    tables = model.per_value(scales, bins)
    state, out = STATE_LOW, bytearray()
    bound = (STATE_LOW >> PRECISION) << 8
    for symbol, (freqs, starts, _, _) in zip(reversed((symbols + MAX_SYMBOL).tolist()), reversed(tables)):
        freq = freqs[symbol]
        while state >= bound * freq:
            out.append(state & 0xFF)
            state >>= 8
        state = ((state // freq) << PRECISION) + state % freq + starts[symbol]
    out += state.to_bytes(STATE_BYTES, "little")
    return bytes(reversed(out))


def decode(data: bytes, scales: np.ndarray, bins: np.ndarray, model: GaussianModel) -> np.ndarray:
    """The int16 symbols (one per context given) of :func:`encode`'s bytes; EntropyError unless the bytes are
    consumed exactly and the coder ends in its initial state (a truncated or altered stream fails here)."""
    if len(data) < STATE_BYTES:
        raise EntropyError(f"an rANS stream has at least {STATE_BYTES} bytes, got {len(data)}")
    tables = model.per_value(scales, bins)
    state, position, size = int.from_bytes(data[:STATE_BYTES], "big"), STATE_BYTES, len(data)
    out = [0] * len(tables)
    mask = TOTAL - 1
    for i, (freqs, starts, symbols, _) in enumerate(tables):
        slot = state & mask
        symbol = symbols[slot]
        out[i] = symbol
        state = freqs[symbol] * (state >> PRECISION) + slot - starts[symbol]
        while state < STATE_LOW:
            if position >= size:
                raise EntropyError("rANS stream ends early")
            state = (state << 8) | data[position]
            position += 1
    if state != STATE_LOW or position != size:
        raise EntropyError("rANS stream does not end where its symbols do (corrupt, or another model's)")
    return np.array(out, np.int16) - MAX_SYMBOL
