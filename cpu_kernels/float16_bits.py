"""float16 values kept as their bits (Numba has no float16 arrays), widened in Numba code."""

import numpy as np
from numba import njit


@njit(inline="always")
def half_to_float32(bits):
    """The float32 value of float16 bits (exact: every float16 is a float32)."""
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0:  # zero and subnormals: mantissa * 2^-24
        value = np.float32(mantissa) * np.float32(2.0**-24)
    elif exponent == 0x1F:
        value = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    else:
        value = np.float32(1024 + mantissa) * np.float32(2.0 ** (np.int64(exponent) - 25))
    return -value if bits & 0x8000 else value
