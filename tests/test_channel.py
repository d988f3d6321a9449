"""The local `pydist.Channel` (Julia's `Channel{Any}(sz)`): no workers needed.

Blocking is checked with threads and events: an operation that must block is shown not to
have finished within a short bounded wait, then released by the operation that unblocks it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import pytest

import pydist
from pydist import Channel, InvalidStateError

from conftest import wait_until

# How long a blocked operation must stay blocked for us to believe it is blocked.
BLOCKED = 0.25
# How long an operation that was just released may take to finish.
RELEASED = 10.0


class Runner:
    """Run `fn()` in a daemon thread; remember its result or exception; `done` is an Event."""

    def __init__(self, fn, *args, **kwargs):
        self.done = threading.Event()
        self.started = threading.Event()
        self.result = None
        self.exc: BaseException | None = None

        def run():
            self.started.set()
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                self.exc = e
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(RELEASED)

    def assert_blocked(self):
        assert not self.done.wait(BLOCKED), f"expected to block, finished with {self.result!r} / {self.exc!r}"

    def value(self):
        assert self.done.wait(RELEASED), "did not finish after being released"
        if self.exc is not None:
            raise self.exc
        return self.result

    def error(self):
        assert self.done.wait(RELEASED), "did not finish after being released"
        assert self.exc is not None, f"expected an exception, got {self.result!r}"
        return self.exc


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize("sz", [-1, -5, 1.5, "3", None, True, False, -math.inf, math.nan, [1]])
def test_invalid_sizes_raise_value_error(sz):
    with pytest.raises(ValueError):
        Channel(sz)


@pytest.mark.parametrize("sz", [0, 1, 7, math.inf])
def test_valid_sizes_make_an_open_empty_channel(sz):
    ch = Channel(sz)
    assert ch.isopen()
    assert ch.isempty()
    assert not ch.isready()
    assert len(ch) == 0


def test_exported_from_package():
    assert pydist.Channel is Channel
    assert issubclass(InvalidStateError, Exception)


# ------------------------------------------------------------------ unbuffered
def test_default_channel_is_unbuffered_put_waits_for_take():
    ch = Channel()
    putter = Runner(ch.put, "x")
    putter.assert_blocked()
    assert ch.take(timeout=RELEASED) == "x"
    putter.value()  # returns once the value was taken
    assert ch.isempty()


def test_unbuffered_put_blocks_until_take():
    ch = Channel(0)
    putter = Runner(ch.put, 42)
    putter.assert_blocked()
    # A waiting putter makes the channel ready (Julia: n_avail counts waiting putters).
    wait_until(ch.isready, timeout=RELEASED, what="a waiting putter")
    assert ch.take() == 42
    putter.value()
    assert not ch.isready()


def test_unbuffered_take_blocks_until_put():
    ch = Channel(0)
    taker = Runner(ch.take)
    taker.assert_blocked()
    ch.put("hello", timeout=RELEASED)  # a taker is waiting, so this completes
    assert taker.value() == "hello"
    assert ch.isempty()


def test_unbuffered_preserves_put_order_of_waiting_putters():
    ch = Channel(0)
    putters = []
    for i in range(5):
        putters.append(Runner(ch.put, i))
        wait_until(lambda: len(ch) == i + 1, timeout=RELEASED, what=f"putter {i} waiting")
    assert [ch.take(timeout=RELEASED) for _ in range(5)] == [0, 1, 2, 3, 4]
    for p in putters:
        p.value()


def test_unbuffered_put_timeout_withdraws_the_value():
    ch = Channel(0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.put("late", timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < RELEASED
    # The value that nobody took is not left behind for a later taker.
    assert not ch.isready()
    assert len(ch) == 0
    with pytest.raises(TimeoutError):
        ch.take(timeout=0.1)


def test_unbuffered_close_wakes_a_waiting_putter():
    ch = Channel(0)
    putter = Runner(ch.put, 1)
    putter.assert_blocked()
    ch.close()
    assert isinstance(putter.error(), InvalidStateError)


# ------------------------------------------------------------------ bounded
def test_bounded_put_blocks_when_full():
    ch = Channel(2)
    ch.put(1)
    ch.put(2)
    assert len(ch) == 2
    putter = Runner(ch.put, 3)
    putter.assert_blocked()
    assert len(ch) == 2
    assert ch.take() == 1
    putter.value()
    assert len(ch) == 2
    assert [ch.take(), ch.take()] == [2, 3]
    assert ch.isempty()


def test_bounded_put_timeout_when_full_leaves_contents_alone():
    ch = Channel(1)
    ch.put("a")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.put("b", timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < RELEASED
    assert len(ch) == 1
    assert ch.take() == "a"
    assert ch.isempty()


def test_bounded_fifo_order():
    ch = Channel(5)
    for i in range(5):
        ch.put(i, timeout=1)
    assert [ch.take(timeout=1) for _ in range(5)] == list(range(5))


def test_bounded_take_blocks_until_put():
    ch = Channel(3)
    taker = Runner(ch.take)
    taker.assert_blocked()
    ch.put("v")
    assert taker.value() == "v"
    assert ch.isempty()


def test_infinite_channel_never_blocks_put():
    ch = Channel(math.inf)
    n = 20_000
    for i in range(n):
        ch.put(i, timeout=0)  # would raise TimeoutError if it had to wait
    assert len(ch) == n
    assert ch.take() == 0
    assert ch.fetch() == 1
    assert len(ch) == n - 1
    rest = [ch.take(timeout=0) for _ in range(n - 1)]
    assert rest == list(range(1, n))
    assert ch.isempty()


# ------------------------------------------------------------------ fetch / isready / wait
def test_fetch_peeks_without_removing():
    ch = Channel(4)
    ch.put("first")
    ch.put("second")
    assert ch.fetch() == "first"
    assert ch.fetch() == "first"
    assert len(ch) == 2
    assert ch.take() == "first"
    assert ch.fetch() == "second"
    assert len(ch) == 1
    assert ch.isready()


def test_fetch_blocks_until_a_value_arrives_and_leaves_it():
    ch = Channel(1)
    fetcher = Runner(ch.fetch)
    fetcher.assert_blocked()
    ch.put({"k": 1})
    assert fetcher.value() == {"k": 1}
    assert len(ch) == 1
    assert ch.take() == {"k": 1}


def test_isready_isempty_len_track_contents():
    ch = Channel(3)
    assert (ch.isready(), ch.isempty(), len(ch)) == (False, True, 0)
    ch.put(None)  # None is a value like any other
    assert (ch.isready(), ch.isempty(), len(ch)) == (True, False, 1)
    ch.put(0)
    assert len(ch) == 2
    assert ch.take() is None
    assert ch.take() == 0
    assert (ch.isready(), ch.isempty(), len(ch)) == (False, True, 0)


def test_wait_blocks_until_value_and_does_not_consume():
    ch = Channel(2)
    waiter = Runner(ch.wait)
    waiter.assert_blocked()
    ch.put("w")
    waiter.value()
    assert len(ch) == 1
    ch.wait()  # a value is there: returns at once
    ch.wait(timeout=0)
    assert ch.take() == "w"


@pytest.mark.parametrize("op", ["take", "fetch", "wait"])
@pytest.mark.parametrize("sz", [0, 1, math.inf])
def test_timeouts_on_empty_channel(op, sz):
    ch = Channel(sz)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        getattr(ch, op)(timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < RELEASED
    assert ch.isopen() and ch.isempty()


def test_zero_timeout_on_empty_raises_at_once_and_on_ready_returns():
    ch = Channel(1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.take(timeout=0)
    assert time.monotonic() - t0 < 1.0
    ch.put(5)
    assert ch.fetch(timeout=0) == 5
    assert ch.take(timeout=0) == 5


# ------------------------------------------------------------------ close
def test_close_and_isopen():
    ch = Channel(2)
    assert ch.isopen()
    ch.close()
    assert not ch.isopen()
    ch.close()  # idempotent
    assert not ch.isopen()


@pytest.mark.parametrize("sz", [0, 1, math.inf])
def test_put_on_closed_raises_invalid_state(sz):
    ch = Channel(sz)
    ch.close()
    with pytest.raises(InvalidStateError):
        ch.put(1)
    with pytest.raises(InvalidStateError):
        ch.put(1, timeout=0.1)
    assert ch.isempty()


@pytest.mark.parametrize("sz", [0, 1, math.inf])
def test_take_fetch_wait_on_closed_empty_raise_invalid_state(sz):
    ch = Channel(sz)
    ch.close()
    for op in (ch.take, ch.fetch, ch.wait):
        t0 = time.monotonic()
        with pytest.raises(InvalidStateError):
            op()
        with pytest.raises(InvalidStateError):  # a timeout does not turn it into TimeoutError
            op(timeout=5)
        assert time.monotonic() - t0 < 2.0


def test_take_on_closed_nonempty_drains_then_raises():
    ch = Channel(3)
    for v in "abc":
        ch.put(v)
    ch.close()
    assert ch.isready()
    assert ch.fetch() == "a"
    ch.wait()
    assert [ch.take(), ch.take(), ch.take()] == ["a", "b", "c"]
    with pytest.raises(InvalidStateError):
        ch.take()
    assert ch.isempty()


@pytest.mark.parametrize("op", ["take", "fetch", "wait"])
def test_close_wakes_blocked_readers(op):
    ch = Channel(1)
    r = Runner(getattr(ch, op))
    r.assert_blocked()
    ch.close()
    assert isinstance(r.error(), InvalidStateError)


def test_close_wakes_putter_blocked_on_full():
    ch = Channel(1)
    ch.put("kept")
    putter = Runner(ch.put, "refused")
    putter.assert_blocked()
    ch.close()
    assert isinstance(putter.error(), InvalidStateError)
    assert ch.take() == "kept"  # what was in the buffer stays takeable
    with pytest.raises(InvalidStateError):
        ch.take()


def test_invalid_state_error_is_a_pydist_error():
    ch = Channel(1)
    ch.close()
    with pytest.raises(pydist.PydistError):
        ch.put(1)


# ------------------------------------------------------------------ iteration
@pytest.mark.parametrize("sz", [0, 1, 10, math.inf])
def test_iteration_ends_when_closed_and_empty(sz):
    ch = Channel(sz)

    def produce():
        for i in range(100):
            ch.put(i)
        ch.close()

    prod = Runner(produce)
    assert list(ch) == list(range(100))
    prod.value()
    assert not ch.isopen() and ch.isempty()


def test_iteration_of_closed_channel_drains_buffer():
    ch = Channel(math.inf)
    for i in range(5):
        ch.put(i)
    ch.close()
    assert list(ch) == [0, 1, 2, 3, 4]
    assert list(ch) == []


def test_iteration_waits_while_open():
    ch = Channel(2)
    ch.put(1)
    got = []

    def consume():
        for v in ch:
            got.append(v)
        return list(got)

    consumer = Runner(consume)
    wait_until(lambda: got == [1], timeout=RELEASED, what="first item consumed")
    consumer.assert_blocked()  # open and empty: iteration waits, it does not end
    ch.put(2)
    wait_until(lambda: got == [1, 2], timeout=RELEASED, what="second item consumed")
    consumer.assert_blocked()
    ch.close()
    assert consumer.value() == [1, 2]


# ------------------------------------------------------------------ many threads
@pytest.mark.parametrize("sz", [0, 1, 4, math.inf])
def test_many_producers_and_consumers_deliver_each_item_exactly_once(sz):
    ch = Channel(sz)
    n_prod, n_cons, per = 8, 8, 400
    results: list[list] = [[] for _ in range(n_cons)]
    barrier = threading.Barrier(n_prod + n_cons)

    def producer(k):
        barrier.wait()
        for i in range(per):
            ch.put((k, i))

    def consumer(j):
        barrier.wait()
        for v in ch:
            results[j].append(v)

    prods = [threading.Thread(target=producer, args=(k,), daemon=True) for k in range(n_prod)]
    conss = [threading.Thread(target=consumer, args=(j,), daemon=True) for j in range(n_cons)]
    for t in prods + conss:
        t.start()
    for t in prods:
        t.join(60)
        assert not t.is_alive(), "a producer is stuck"
    ch.close()
    for t in conss:
        t.join(60)
        assert not t.is_alive(), "a consumer is stuck"

    everything = [v for r in results for v in r]
    counts = Counter(everything)
    assert len(everything) == n_prod * per
    assert all(c == 1 for c in counts.values())
    assert set(counts) == {(k, i) for k in range(n_prod) for i in range(per)}
    # Each consumer saw each producer's items in the order they were put.
    for r in results:
        for k in range(n_prod):
            seq = [i for (kk, i) in r if kk == k]
            assert seq == sorted(seq)
    assert ch.isempty()


# ==================================================================== giving back, abandoning
@pytest.mark.parametrize("sz", [0, 1, 3, math.inf])
def test_put_front_gives_a_value_back_before_the_others_whatever_the_bound(sz):
    ch = Channel(sz)
    if sz == 0:
        putter = Runner(ch.put, "b")
        wait_until(ch.isready, timeout=RELEASED, what="a waiting putter")
    else:
        ch.put("b")
    ch.put_front("a")  # a full channel takes it too
    assert len(ch) == 2
    assert [ch.take(timeout=RELEASED), ch.take(timeout=RELEASED)] == ["a", "b"]
    if sz == 0:
        assert putter.value() == "b"
    ch.put_front("c")
    ch.close()
    assert list(ch) == ["c"]


@pytest.mark.parametrize("op", ["take", "fetch", "wait"])
def test_an_abandoned_wait_stops_when_woken_and_takes_nothing(op):
    from pydist.channel import Abandoned

    ch = Channel(3)
    gave_up = threading.Event()
    r = Runner(getattr(ch, "_" + op), None, gave_up.is_set)
    r.assert_blocked()
    gave_up.set()
    ch._wake()
    assert isinstance(r.error(), Abandoned)
    ch.put(1)
    assert ch.take(timeout=RELEASED) == 1


@pytest.mark.parametrize("sz", [0, 1])
def test_an_abandoned_put_is_withdrawn(sz):
    from pydist.channel import Abandoned

    ch = Channel(sz)
    if sz:
        ch.put("x")
    gave_up = threading.Event()
    r = Runner(ch._put, "y", None, gave_up.is_set)
    r.assert_blocked()
    gave_up.set()
    ch._wake()
    assert isinstance(r.error(), Abandoned)
    assert len(ch) == sz  # "y" is not in it
