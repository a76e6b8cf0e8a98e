"""benchmarks.int4_grid's GPTQ blocks: on an integer-zero-point 4-bit grid, and better than rounding where it counts."""

import numpy as np

from benchmarks.int4_grid import gptq_blocks, rtn_scaled


def _correlated_inputs(rng: np.random.Generator, k: int) -> np.ndarray:
    mixing = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    return rng.standard_normal((2048, k)) @ mixing + 0.5  # correlated channels with a mean, like hidden states


def test_gptq_blocks_stay_on_an_integer_zero_point_grid_and_beat_rounding_on_the_output():
    rng = np.random.default_rng(0)
    k, n = 64, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = _correlated_inputs(rng, k)
    moments = x.T @ x / len(x)
    out = gptq_blocks(w, moments)
    for start in range(0, k, 32):
        block = out[start : start + 32].astype(np.float64)
        for column in block.T:
            levels = np.unique(np.round(column, 6))
            assert len(levels) <= 16
            steps = np.diff(levels)
            scale = steps.min()
            assert np.allclose(steps / scale, np.round(steps / scale), atol=1e-3)  # multiples of one step
            assert np.allclose(levels / scale, np.round(levels / scale), atol=1e-2)  # 0 on the grid: integer zero
    rounded = rtn_scaled(w, 1.0)

    def output_error(weights: np.ndarray) -> float:
        return float(np.mean((x @ (weights - w)) ** 2))

    assert output_error(out) < 0.8 * output_error(rounded)
