"""The workspace pool (fastconv/cpu/_workspace.py): sets per key while they fit the byte bound,
arenas taken over (zeroed where asked) beyond it, never shared by two calls at once."""

import numpy as np
import pytest

from fastconv.cpu import _workspace as W


@pytest.fixture
def pool(monkeypatch):
    W.clear()
    monkeypatch.setattr(W, "MAX_KEPT_BYTES", 1 << 20)
    yield W
    W.clear()


def _make(n):
    def make(alloc):
        return alloc((n,)), alloc((3,), np.int64, zero=True)

    return make


def test_sets_that_fit_are_kept_per_key(pool):
    with pool.checkout("a", _make(1000)) as (a, _):
        a[:] = 1.0
    with pool.checkout("b", _make(1000)) as (b, _):
        b[:] = 2.0
    with pool.checkout("a", _make(1000)) as (a, _):
        assert (a == 1.0).all()  # its own arena: the same set, untouched by "b"
    assert pool.idle_workspaces() == 2
    assert a.ctypes.data % 64 == 0


def test_over_the_bound_an_arena_is_taken_over_and_zeroed(pool):
    n = (600 << 10) // 4  # 600 KiB: two do not fit the 1 MiB bound
    with pool.checkout("big-a", _make(n)) as (a, offs):
        a[:] = np.nan
        offs[:] = 7
    with pool.checkout("big-b", _make(n)) as (b, offs_b):
        assert b.ctypes.data == a.ctypes.data  # the same memory
        assert (offs_b == 0).all()  # zeroed as asked, not a's 7s
    assert pool.idle_workspaces() == 1


def test_a_set_larger_than_the_bound_is_kept_alone(pool):
    with pool.checkout("small", _make(100)):
        pass
    with pool.checkout("big", _make(1 << 19)) as (big, _):  # 2 MiB
        assert big.shape == (1 << 19,)
    assert pool.idle_workspaces() == 1


def test_calls_at_once_get_their_own_arenas(pool):
    with pool.checkout("a", _make(100)) as (a, _):
        with pool.checkout("a", _make(100)) as (a2, _):
            assert a.ctypes.data != a2.ctypes.data


def test_the_running_count_of_idle_bytes_stays_the_sum(pool, monkeypatch):
    # The pool counts its idle bytes as arenas come and go; every path must keep the count
    # equal to the sum: reuse, take-over, eviction over the bound and over MAX_IDLE, clear.
    monkeypatch.setattr(pool, "MAX_IDLE", 3)
    sizes = [100, 70_000, 200_000, 150, 90_000, 260_000, 100, 5]
    for n in sizes * 2:
        with pool.checkout(f"k{n}", _make(n)):
            assert pool._kept == pool.kept_bytes()
        assert pool._kept == pool.kept_bytes()
        assert pool.idle_workspaces() <= 3
    pool.clear()
    assert pool._kept == 0 == pool.kept_bytes()
