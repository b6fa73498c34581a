"""The thread count of decodekit's CPU kernels.

The CPU kernels run on decodekit's own thread pool (``csrc/cpu/common/thread_pool.cpp``): the
calling thread claims rows from a shared counter together with the workers and finishes whatever
nobody else claimed, so a worker the operating system has not scheduled costs nothing; idle
workers sleep (a ~20 us spin, then a futex). Results never depend on the thread count: every row
or tile is computed on its own in a fixed order, whichever thread takes it.

How many threads a call uses, first match wins:

1. :func:`set_num_threads` (``n >= 1``);
2. the environment variable ``DECODEKIT_NUM_THREADS`` (an integer >= 1, read at import);
3. ``torch.get_num_threads()`` at the time of the call.
"""

from __future__ import annotations

import os
from typing import Optional

from ._loader import _C

#: The environment variable that sets the default thread count (an integer >= 1).
ENV_VAR = "DECODEKIT_NUM_THREADS"
#: The largest thread count accepted.
MAX_THREADS = 1024


def _check_count(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{what} must be an int in [1, {MAX_THREADS}] (or None for the default), got {n!r}")
    return int(n)


def _env_threads() -> int:
    """DECODEKIT_NUM_THREADS as an int >= 1, or 0 when unset or empty; a bad value raises ImportError."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return 0
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise ImportError(
            f"decodekit: {ENV_VAR}={value!r} is not a thread count; use an integer in [1, {MAX_THREADS}], or unset it "
            "to follow torch.get_num_threads()"
        )
    return n


_ENV_THREADS = _env_threads()


def set_num_threads(n: Optional[int]) -> None:
    """Set how many threads decodekit's CPU kernels use.

    Args:
        n: an int in [1, 1024], or None to go back to the default (``DECODEKIT_NUM_THREADS`` if it
            was set at import, else ``torch.get_num_threads()`` at each call).

    Raises:
        ValueError: ``n`` is not None and not an int in [1, 1024] (bool is refused).

    The setting is process-wide and does not change torch's own thread count. Results are the same
    bits for every thread count; only the speed changes. One thread avoids waiting on other
    threads altogether, which can be fastest on a machine busy with other processes.
    """
    _C._set_num_threads(_ENV_THREADS if n is None else _check_count(n, "decodekit.set_num_threads: n"))


def get_num_threads() -> int:
    """The number of threads decodekit's CPU kernels use now (an int >= 1; see :func:`set_num_threads`)."""
    return int(_C._num_threads())


def _get_setting() -> int:
    """The raw setting: 0 when following torch.get_num_threads(), else the thread count."""
    return int(_C._num_threads_setting())


def _restore_setting(setting: int) -> None:
    _C._set_num_threads(int(setting))


class threads_for_call:
    """Context manager: ``with threads_for_call(n):`` runs its body with ``n`` threads (None: leave
    the setting as it is) and restores the previous setting afterwards, also on error."""

    def __init__(self, n: Optional[int], what: str = "threads"):
        self._n = None if n is None else _check_count(n, what)
        self._saved = 0

    def __enter__(self) -> threads_for_call:
        self._saved = _get_setting()
        if self._n is not None:
            _C._set_num_threads(self._n)
        return self

    def __exit__(self, *exc) -> None:
        _restore_setting(self._saved)


if _ENV_THREADS:
    _C._set_num_threads(_ENV_THREADS)
