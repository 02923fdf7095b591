"""The sampling protocol (the paper's, MeZO-style), as pure functions over row indices.

- train and dev: `num_train` and `num_dev` rows drawn without overlap from the official
  train split with the run's `seed` (one permutation: dev is its head, train what follows).
  Both keep the permutation's order, so any prefix of train is itself a random sample
  (GEM's gradient pass reads the first `num_grad_samples` training examples).
- test: the official validation split (or the configured test split), capped at `num_test`
  by a subset drawn with a fixed `test_seed` (default 0) that does not depend on the run
  seed: every seed and every method scores the very same test examples. Sorted by row.
- too small a train split (num_train + num_dev > rows; CB 250, COPA 400): dev gets
  `round(frac * rows)` rows (at least 1, at most num_dev), train the rest up to num_train,
  where frac is the task's `small_train_dev_fraction` (COPA 0.1 -> 360/40 as the paper;
  CB 0.2 -> 200/50) or else the requested share num_dev / (num_train + num_dev), but never
  less than min(num_dev, 10 % of the rows) (a huge num_train asks for "all the rest", not a
  one-example dev set).
- `null` sizes mean "all": num_test null = the whole test split; num_train null = every
  row not in dev; num_dev null = every row not in train; both null = dev gets
  `small_train_dev_fraction` (default 0.1) of the rows.
- no train split at all (BoolQ, QNLI offline): `fallback_split` carves a fixed test pool of
  min(num_test, half the rows) out of the validation split with `test_seed`; train and dev
  are drawn with `seed` from the other rows by the rules above.
"""

from __future__ import annotations

import numpy as np

DEFAULT_DEV_FRACTION = 0.1


def _perm(n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(int(seed)).permutation(n)]


def draw_test(n: int, num_test: int | None, test_seed: int) -> list[int]:
    """Row indices of the test subset: all rows, or `num_test` fixed by `test_seed` (sorted)."""
    if num_test is None or num_test >= n:
        return list(range(n))
    return sorted(_perm(n, test_seed)[:num_test])


def train_dev_sizes(n: int, num_train: int | None, num_dev: int | None,
                    small_train_dev_fraction: float | None) -> tuple[int, int, str | None]:
    """(train size, dev size, note) for a pool of `n` rows; the note explains any shortfall."""
    if num_train is None and num_dev is None:
        n_dev = round((small_train_dev_fraction or DEFAULT_DEV_FRACTION) * n)
        return n - n_dev, n_dev, None
    if num_dev is None:
        if num_train < n:
            return num_train, n - num_train, None
        num_dev = round((small_train_dev_fraction or DEFAULT_DEV_FRACTION) * n)
        return n - num_dev, num_dev, (
            f"num_train={num_train} >= {n} available rows with num_dev=null: dev keeps "
            f"{num_dev} rows ({small_train_dev_fraction or DEFAULT_DEV_FRACTION:g} of them)")
    if num_train is None:
        n_dev = min(num_dev, n)
        return n - n_dev, n_dev, None
    if num_train + num_dev <= n:
        return num_train, num_dev, None
    if small_train_dev_fraction is not None:
        frac, why = small_train_dev_fraction, f"small_train_dev_fraction={small_train_dev_fraction:g}"
    else:
        # the requested share, but never below min(num_dev, 10 % of the rows): a num_train far
        # beyond the data (`task.num_train=100000` for "all") must not shrink dev to one example
        share = num_dev / (num_train + num_dev) if num_train + num_dev else 0.0
        least = min(num_dev, round(DEFAULT_DEV_FRACTION * n)) / n
        frac = max(share, least)
        why = (f"the requested dev share {num_dev}/({num_train}+{num_dev})" if share >= least else
               f"min(num_dev, {DEFAULT_DEV_FRACTION:g})")
    n_dev = min(num_dev, max(1 if num_dev else 0, round(frac * n)))
    n_train = min(num_train, n - n_dev)
    note = (f"the train split has only {n} rows (< num_train {num_train} + num_dev {num_dev}): "
            f"train/dev = {n_train}/{n_dev}, dev = {why} of the rows, train = the rest")
    return n_train, n_dev, note


def draw_train_dev(n: int, num_train: int | None, num_dev: int | None, seed: int,
                   small_train_dev_fraction: float | None = None) -> tuple[list[int], list[int], str | None]:
    """Disjoint (train, dev) row indices drawn from `n` rows with `seed`, plus a shortfall note."""
    n_train, n_dev, note = train_dev_sizes(n, num_train, num_dev, small_train_dev_fraction)
    perm = _perm(n, seed)
    return perm[n_dev:n_dev + n_train], perm[:n_dev], note


def draw_from(n: int, k: int | None, seed: int) -> list[int]:
    """`k` rows (all when k is None) of `n`, in a `seed` permutation's order."""
    perm = _perm(n, seed)
    return perm if k is None else perm[:k]


def fallback_split(n: int, num_test: int | None, test_seed: int) -> tuple[list[int], list[int]]:
    """Split a validation split of `n` rows into (test rows, rest) when no train split exists.

    The test pool is fixed by `test_seed`: min(num_test, n // 2) rows (n // 2 when num_test is
    null). The rest (sorted) is the pool that train and dev are drawn from with the run seed.
    """
    n_test = n // 2 if num_test is None else min(num_test, n // 2)
    perm = _perm(n, test_seed)
    return sorted(perm[:n_test]), sorted(perm[n_test:])
