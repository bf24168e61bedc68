"""The model's trees compiled to machine code with lleaves, used only once proved equal.

``lightgbm.Booster.predict`` walks the trees as data; `lleaves <https://github.com/siboehm/lleaves>`_
compiles a LightGBM text model through LLVM into one function per forest. Measured here on the
served model (91 trees, one thread): 1,000 rows in 2.8 ms instead of 8.6 ms, one row in 25 us
instead of 47 us (``benchmarks/README.md``). It releases the GIL while it runs, like LightGBM.

It is a second implementation of the model, so, as with the fast feature path, it is never
trusted blindly:

- the source is the verified booster's own text (the registry checked the file's sha256);
- after compiling, its probabilities are compared with ``Booster.predict`` on a matrix that
  spans the model's inputs (the fast path's sample, the same rows with each column missing in
  turn, and shuffled combinations); any difference above :data:`TOLERANCE` leaves the
  predictor on LightGBM, with the reason in its status;
- nothing compiled is ever read from or written to disk (no cache file: machine code loaded
  from a file would be as unsafe as a pickle).

Compiling is slow (~1.4 s for 91 trees, ~14 s for 500 trees of 63 leaves), so a serving replica
compiles after a model takes traffic, on a thread of its own; LightGBM answers until then.
Inlining is off: it made the 91-tree model ~25 % faster but took 4 s to compile it, and
168 s for the 500-tree one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

# Summation order differs from LightGBM's by a few ulps (measured: <= 4e-16 on probabilities).
TOLERANCE = 1e-12
# From this many rows a prediction is split in two: the caller scores one half while one
# long-lived helper thread scores the other (1,000 rows: 1.6 ms instead of 2.1-2.8 ms here;
# lleaves' own ``n_jobs`` starts a thread pool per call, 1.8-2.2 ms). Below, the hand-over
# costs more than it saves.
SPLIT_MIN_ROWS = 256


def _new_helper() -> ThreadPoolExecutor | None:
    return ThreadPoolExecutor(1, "mlops-trees") if (os.cpu_count() or 1) > 1 else None


_HELPER = _new_helper()


def _helper_after_fork() -> None:
    # A forked child has none of the parent's threads, but an executor that started its thread
    # believes it still has it: work submitted in the child would wait forever.
    global _HELPER
    _HELPER = _new_helper()


os.register_at_fork(after_in_child=_helper_after_fork)


@dataclass(frozen=True)
class CompiledTrees:
    """A compiled forest: ``predict(matrix)`` gives what ``Booster.predict`` gives."""

    model: object  # lleaves.Model, imported lazily (llvmlite is only needed to compile)
    compile_seconds: float

    @classmethod
    def compile(cls, booster: lgb.Booster) -> CompiledTrees:
        """Compile ``booster``'s trees; raises whatever lleaves raises on a model it cannot."""
        import lleaves

        started = time.perf_counter()
        # lleaves reads a file; the text is the verified booster's and the file lives only
        # for the compile.
        with tempfile.TemporaryDirectory(prefix="mlops-trees-") as folder:
            path = os.path.join(folder, "model.txt")
            booster.save_model(path)
            model = lleaves.Model(model_file=path)
            model.compile(finline=False)
        return cls(model, time.perf_counter() - started)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        model = self.model
        if len(matrix) < SPLIT_MIN_ROWS or _HELPER is None:
            return model.predict(matrix, n_jobs=1)  # type: ignore[attr-defined]
        # Half on the helper thread, half here: both release the GIL in the compiled code.
        half = len(matrix) // 2
        rest = _HELPER.submit(model.predict, matrix[half:], 1)  # type: ignore[attr-defined]
        first = model.predict(matrix[:half], n_jobs=1)  # type: ignore[attr-defined]
        return np.concatenate([first, rest.result()])


def probe_matrix(sample: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rows that reach many leaves: ``sample``, each column blanked, and shuffled combinations."""
    rng = np.random.default_rng(seed)
    blanked = []
    for column in range(sample.shape[1]):
        rows = sample.copy()
        rows[:, column] = np.nan
        blanked.append(rows)
    # Each column drawn independently from the sample's values: combinations the sample lacks.
    mixed = np.column_stack(
        [rng.choice(sample[:, c], size=4 * len(sample)) for c in range(sample.shape[1])]
    )
    return np.ascontiguousarray(np.vstack([sample, *blanked, mixed]), dtype=np.float64)


def verified_trees(
    booster: lgb.Booster, sample: np.ndarray, num_threads: int = 0
) -> tuple[CompiledTrees | None, str]:
    """The compiled trees and a status, or None and the reason LightGBM keeps scoring.

    ``num_threads`` is the caller's LightGBM thread count (0: OpenMP's default), used for the
    reference call too: LightGBM keeps it process-wide, and concurrent calls must not mix
    counts (see ``Predictor.num_threads``). The compiled trees do not use it: they run on the
    caller's thread, large batches split with one helper (:data:`SPLIT_MIN_ROWS`).
    """
    if sample.ndim != 2 or not len(sample):
        return None, "lightgbm: no sample to verify compiled trees against"
    probe = probe_matrix(sample)
    expected = booster.predict(probe, **({"num_threads": num_threads} if num_threads else {}))
    try:
        trees = CompiledTrees.compile(booster)
        got = trees.predict(probe)
    except Exception as exc:  # any lleaves failure only means we keep the reference path
        return None, f"lightgbm: the trees did not compile: {type(exc).__name__}: {exc}"
    worst = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else np.inf
    if not worst <= TOLERANCE:  # also catches NaN
        return None, (
            f"lightgbm: compiled trees differ from LightGBM by {worst:.3g} on "
            f"{len(probe)} probe rows"
        )
    return trees, (
        f"compiled (lleaves, {trees.compile_seconds:.1f} s), equal to LightGBM within "
        f"{worst:.1g} on {len(probe)} probe rows"
    )


def in_background(work: Callable[[], object], name: str) -> threading.Thread:
    """Run ``work`` on a daemon thread of its own, 10 nice levels below the caller's priority.

    On Linux a thread has its own nice value (inherited from the thread that started it): the
    serving threads keep the cores first.
    """

    def run() -> None:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: same priority
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + 10))
        work()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
