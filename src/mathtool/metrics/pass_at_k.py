"""The unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code"."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that k of n samples, drawn without replacement, include one of the c correct ones.

    Equals 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i) so that no large
    binomial is ever formed. Valid for every 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_k_values(n_samples: int) -> list[int]:
    """The k reported for a run: 1, 2, 4, 8, ... up to n_samples, plus n_samples itself."""
    ks = [1]
    while ks[-1] * 2 <= n_samples:
        ks.append(ks[-1] * 2)
    if n_samples > ks[-1]:
        ks.append(n_samples)
    return ks
