"""A connection's state, fed reads and times: which fds go with which line,
the fd limits, MSG_CTRUNC and the deadlines (tapd.connection, no I/O).

Expectations come from the wire contract: every fd of a line travels before
its newline (tapd.scm), one message carries at most 253 fds and one request
at most 512, and a message the kernel truncated (MSG_CTRUNC) is refused.
"""

from __future__ import annotations

import array
import itertools
import os
import socket

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tapd import errors
from tapd.connection import MAX_FDS_PER_REQUEST, Connection, FdBudget

FUZZ = settings(max_examples=300, deadline=None)
UID, OTHER = 1000, 1001
PLENTY = 1 << 20


def connection(
    budget: FdBudget | None = None, *, uid: int = UID, now: float = 0.0, **limits: int
) -> Connection:
    return Connection(
        uid,
        budget if budget is not None else FdBudget(PLENTY),
        now=now,
        request_timeout=30.0,
        lifetime=600.0,
        **limits,
    )


def receive(
    conn: Connection,
    data: bytes,
    fds: list[int] | None = None,
    *,
    truncated: bool = False,
    per_uid: int = PLENTY,
) -> None:
    conn.receive(data, fds or [], truncated, max_fds_per_uid=per_uid)


def requests(conn: Connection) -> list[tuple[bytes, list[int]]]:
    out = []
    while (request := conn.next_request()) is not None:
        out.append(request)
    return out


# -- which fds belong to which line ---------------------------------------------


def test_fds_go_with_the_line_they_came_before() -> None:
    conn = connection()
    receive(conn, b'{"op":"hel', [10, 11])
    assert requests(conn) == []
    assert conn.pending_fds == 2
    receive(conn, b'lo"}\n{"op":"hello"}\n')
    assert requests(conn) == [(b'{"op":"hello"}', [10, 11]), (b'{"op":"hello"}', [])]
    assert conn.pending_fds == 0
    assert conn.handled == 2


def test_fds_go_with_the_line_that_holds_the_last_byte_of_their_read() -> None:
    """The kernel glues a message without fds to the one with fds after it,
    and ends the read there: the fds are the later line's."""
    conn = connection()
    receive(conn, b'{"op":"hello"}\n{"op":"request"}\n', [12])
    assert requests(conn) == [(b'{"op":"hello"}', []), (b'{"op":"request"}', [12])]
    # The same when the line with fds is not yet complete.
    receive(conn, b'{"op":"hello"}\n{"op":"req', [13])
    assert requests(conn) == [(b'{"op":"hello"}', [])]
    receive(conn, b'uest"}\n')
    assert requests(conn) == [(b'{"op":"request"}', [13])]
    assert conn.pending_fds == 0


def test_a_pipelined_line_without_fds_leaves_the_next_lines_fds_to_it() -> None:
    """Through a real socket: the client writes a line without fds, then a
    line with one, before tapd reads; one read brings both."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, open(os.devnull) as passed:
        a.sendall(b'{"op":"hello"}\n')
        a.sendmsg(
            [b'{"op":"request"}\n'],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed.fileno()]))],
        )
        data, fds, flags, _ = socket.recv_fds(b, 65536, 8)
        try:
            assert data == b'{"op":"hello"}\n{"op":"request"}\n'  # what the kernel does
            conn = connection()
            conn.receive(data, fds, bool(flags & socket.MSG_CTRUNC), max_fds_per_uid=PLENTY)
            assert requests(conn) == [(b'{"op":"hello"}', []), (b'{"op":"request"}', fds)]
        finally:
            for fd in fds:
                os.close(fd)


def test_fds_that_came_with_bytes_of_an_unfinished_line_wait_for_its_newline() -> None:
    conn = connection()
    receive(conn, b"a\nb", [3])
    assert requests(conn) == [(b"a", [])]
    assert conn.pending_fds == 1
    receive(conn, b"\n", [4])
    assert requests(conn) == [(b"b", [3, 4])]


def test_close_gives_back_the_fds_of_a_line_never_finished() -> None:
    budget = FdBudget(PLENTY)
    conn = connection(budget)
    receive(conn, b"no newline", [5, 6])
    assert conn.close() == [5, 6]
    assert conn.close() == []
    # Still counted until the caller lets go of them.
    assert budget.held == 2
    budget.release(UID, 2)
    assert budget.held == 0
    assert budget.of(UID) == 0


def test_every_fd_received_counts_until_released() -> None:
    budget = FdBudget(PLENTY)
    conn = connection(budget)
    receive(conn, b"x\n", [1, 2, 3])
    ((_, fds),) = requests(conn)
    assert budget.held == budget.of(UID) == 3
    budget.release(UID, len(fds))
    assert budget.held == budget.of(UID) == 0


# -- the limits --------------------------------------------------------------------


def test_a_truncated_message_is_refused_even_without_fds() -> None:
    conn = connection()
    with pytest.raises(errors.TooManyFds) as caught:
        receive(conn, b'{"op":"hello"}\n', truncated=True)
    assert caught.value.code == "too-many-fds"
    assert "253" in caught.value.message


def test_a_truncated_message_keeps_the_fds_that_did_arrive_for_closing() -> None:
    budget = FdBudget(PLENTY)
    conn = connection(budget)
    with pytest.raises(errors.TooManyFds):
        receive(conn, b"x", [7, 8], truncated=True)
    assert conn.close() == [7, 8]
    assert budget.held == 2


def test_the_per_request_limit_counts_fds_gathered_over_several_reads() -> None:
    assert MAX_FDS_PER_REQUEST == 512
    conn = connection()
    fd = itertools.count(100)
    receive(conn, b'{"op"', [next(fd) for _ in range(253)])
    receive(conn, b': "he', [next(fd) for _ in range(253)])
    receive(conn, b"l", [next(fd) for _ in range(6)])  # 512: still allowed
    with pytest.raises(errors.TooManyFds) as caught:
        receive(conn, b"lo", [next(fd)])
    assert "512" in caught.value.message
    assert caught.value.context == {"fds": 513, "uid_fds": 513, "held_fds": 513}
    assert len(conn.close()) == 513


def test_a_line_starts_the_count_again() -> None:
    conn = connection(max_fds=2)
    receive(conn, b"a\n", [1, 2])
    requests(conn)
    receive(conn, b"b\n", [3, 4])
    assert requests(conn) == [(b"b", [3, 4])]


def test_one_uid_is_held_to_its_own_budget_over_its_connections() -> None:
    budget = FdBudget(PLENTY)
    first, second = connection(budget), connection(budget)
    other = connection(budget, uid=OTHER)
    receive(first, b"parked", list(range(6)), per_uid=10)
    with pytest.raises(errors.TooManyFds) as caught:
        receive(second, b"parked", list(range(10, 15)), per_uid=10)
    assert f"uid {UID} has 11" in caught.value.message
    assert "max_fds_per_uid = 10" in caught.value.message
    assert caught.value.context == {"fds": 5, "uid_fds": 11, "held_fds": 11}
    # Another uid still gets its fds taken.
    receive(other, b"x\n", list(range(20, 30)), per_uid=10)
    assert requests(other) == [(b"x", list(range(20, 30)))]


def test_while_a_uid_is_over_its_budget_even_a_line_without_fds_is_refused() -> None:
    budget = FdBudget(PLENTY)
    parked, fresh = connection(budget), connection(budget)
    with pytest.raises(errors.TooManyFds):
        receive(parked, b"p", list(range(11)), per_uid=10)
    with pytest.raises(errors.TooManyFds):
        receive(fresh, b'{"op":"hello"}\n', per_uid=10)
    budget.release(UID, len(parked.close()))
    receive(fresh, b'{"op":"hello"}\n', per_uid=10)


def test_the_global_budget_is_shared_by_every_uid() -> None:
    budget = FdBudget(8)
    receive(connection(budget), b"p", list(range(5)))
    with pytest.raises(errors.TooManyFds) as caught:
        receive(connection(budget, uid=OTHER), b"q", list(range(4)))
    assert "as many file descriptors from clients as it takes" in caught.value.message
    assert caught.value.context == {"fds": 4, "uid_fds": 4, "held_fds": 9}


def test_fds_are_refused_when_the_caller_cannot_let_go_of_them() -> None:
    budget = FdBudget(PLENTY)
    conn = connection(budget)
    conn.receive(b'{"op":"hello"}\n', [], False, max_fds_per_uid=PLENTY, accept_fds=False)
    with pytest.raises(errors.FdsRefused) as caught:
        conn.receive(b"x\n", [4, 5], False, max_fds_per_uid=PLENTY, accept_fds=False)
    assert caught.value.code == "fds-refused"
    assert caught.value.context == {"fds": 2}
    assert conn.close() == [4, 5]
    assert budget.held == 2


def test_a_line_too_long_is_refused_after_the_lines_before_it() -> None:
    conn = connection(max_line=8)
    receive(conn, b"ok\n", [1])
    receive(conn, b"x" * 8)
    assert conn.next_request() == (b"ok", [1])
    with pytest.raises(errors.LineTooLong):
        conn.next_request()


# -- deadlines ---------------------------------------------------------------------


def test_a_request_has_request_timeout_from_the_last_answer() -> None:
    conn = connection(now=100.0)
    assert conn.deadline == 130.0
    assert conn.answered(110.0) is None
    assert conn.deadline == 140.0
    timeout = conn.timeout(140.0)
    assert timeout.code == "timeout"
    assert timeout.context == {"seconds": 30.0}
    assert "no complete request within 30 s" in timeout.message


def test_no_deadline_runs_past_the_connection_lifetime() -> None:
    conn = connection(now=0.0)
    assert conn.answered(590.0) is None
    assert conn.deadline == conn.end_of_life == 600.0
    timeout = conn.timeout(600.0)
    assert timeout.context == {"lifetime": 600.0}
    assert "open 600 s" in timeout.message


def test_an_answer_at_the_end_of_life_ends_the_connection() -> None:
    conn = connection(now=0.0)
    ended = conn.answered(600.0)
    assert ended is not None
    assert ended.context == {"lifetime": 600.0}


# -- fuzz: random chunkings of lines and fds ---------------------------------------


@st.composite
def reads(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int, int, bool]]]:
    """A stream of lines cut into reads: (start, end, fds, truncated) each."""
    lines = draw(st.lists(st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")), max_size=8))
    stream = b"".join(line + b"\n" for line in lines) + draw(st.binary(max_size=6))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream))), max_size=10))))
    bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
    chunks = []
    for start, end in itertools.pairwise(bounds):
        if start == end:
            continue
        fds = draw(st.sampled_from((0, 0, 0, 1, 2, 3)))
        truncated = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else False
        chunks.append((start, end, fds, truncated))
    return stream, chunks


def owner_of(stream: bytes, last: int) -> int | None:
    """The line that fds arriving with the read whose last byte is at ``last``
    belong to: the first whose newline is at or after ``last`` (None: no such
    line)."""
    newline = stream.find(b"\n", last)
    return None if newline < 0 else stream.count(b"\n", 0, newline)


@FUZZ
@given(
    stream_and_reads=reads(),
    max_fds=st.integers(0, 8),
    max_line=st.integers(1, 16),
    per_uid=st.integers(0, 16),
    limit=st.integers(0, 24),
    parked_same=st.integers(0, 4),
    parked_other=st.integers(0, 4),
)
def test_fuzz_every_fd_goes_with_one_line_or_is_let_go_once_and_limits_hold(
    stream_and_reads: tuple[bytes, list[tuple[int, int, int, bool]]],
    max_fds: int,
    max_line: int,
    per_uid: int,
    limit: int,
    parked_same: int,
    parked_other: int,
) -> None:
    stream, chunks = stream_and_reads
    budget = FdBudget(limit)
    # fds parked by other connections, of this uid and of another
    budget.hold(UID, parked_same)
    budget.hold(OTHER, parked_other)
    conn = connection(budget, max_fds=max_fds, max_line=max_line)
    numbers = itertools.count()
    given_out: list[int] = []  # every fd the connection handed back, in order
    got_lines: list[bytes] = []
    owners: dict[int, int | None] = {}  # fd -> the line it must go with
    complete = stream.count(b"\n")
    refused: type[Exception] | None = None
    try:
        for index, (start, end, count, truncated) in enumerate(chunks):
            fds = [next(numbers) for _ in range(count)]
            owner = owner_of(stream, end - 1)
            owners.update(dict.fromkeys(fds, owner))
            # What the limits are over, worked out from positions alone: fds
            # of earlier reads with no newline from their last byte on are
            # still waiting (and this read's, whatever it holds).
            waiting = sum(
                n for _, e, n, _ in chunks[: index + 1] if b"\n" not in stream[e - 1 : start]
            )
            over = (
                truncated
                or waiting > max_fds
                or parked_same + waiting > per_uid
                or parked_same + parked_other + waiting > limit
            )
            try:
                conn.receive(stream[start:end], fds, truncated, max_fds_per_uid=per_uid)
            except errors.TooManyFds:
                assert over
                refused = errors.TooManyFds
                break
            assert not over
            # Nothing beyond the limits is kept.
            assert conn.pending_fds <= max_fds
            assert budget.of(UID) <= per_uid
            assert budget.held <= limit
            while (request := conn.next_request()) is not None:
                line, line_fds = request
                assert all(owners[fd] == len(got_lines) for fd in line_fds)
                got_lines.append(line)
                given_out += line_fds
                budget.release(UID, len(line_fds))
    except errors.LineTooLong:
        refused = errors.LineTooLong
    event(f"refused: {refused and refused.__name__}, lines out: {min(len(got_lines), 3)}")
    left = conn.close()
    given_out += left
    budget.release(UID, len(left))

    # Every fd received came back exactly once, and only the fds of lines
    # never handed out were left for close().
    assert sorted(given_out) == list(owners)
    assert all(owners[fd] is None or owners[fd] >= len(got_lines) for fd in left)
    # The budget is back to what other connections park.
    assert budget.held == parked_same + parked_other
    assert budget.of(UID) == parked_same
    # The lines are the stream's, in order, each within the limit.
    assert got_lines == stream.split(b"\n")[: len(got_lines)]
    assert all(len(line) + 1 <= max_line for line in got_lines)
    if refused is None:
        assert len(got_lines) == complete
        assert len(stream.rsplit(b"\n", 1)[-1]) < max_line


@FUZZ
@given(
    st.lists(
        st.tuples(st.binary(max_size=40), st.integers(0, 300), st.booleans(), st.booleans()),
        max_size=12,
    )
)
def test_fuzz_a_connection_raises_nothing_but_its_refusals(
    reads: list[tuple[bytes, int, bool, bool]],
) -> None:
    budget = FdBudget(600)
    conn = connection(budget, max_line=64)
    numbers = itertools.count()
    try:
        for data, count, truncated, accept in reads:
            conn.receive(
                data,
                [next(numbers) for _ in range(count)],
                truncated,
                max_fds_per_uid=400,
                accept_fds=accept,
            )
            while (request := conn.next_request()) is not None:
                budget.release(UID, len(request[1]))
    except (errors.ProtocolError, errors.FdsRefused):
        pass
    budget.release(UID, len(conn.close()))
    assert budget.held == 0


@FUZZ
@given(
    start=st.floats(0, 1e6),
    timeout=st.floats(0.001, 3600),
    lifetime=st.floats(0.001, 86400),
    steps=st.lists(st.floats(0, 100), max_size=20),
)
def test_fuzz_deadlines_never_pass_the_end_of_life(
    start: float, timeout: float, lifetime: float, steps: list[float]
) -> None:
    conn = Connection(UID, FdBudget(1), now=start, request_timeout=timeout, lifetime=lifetime)
    now = start
    for step in steps:
        assert conn.deadline <= conn.end_of_life
        now += step
        ended = conn.answered(now)
        if now >= start + lifetime:
            assert ended is not None
            assert "lifetime" in ended.context
            return
        assert ended is None
        assert conn.deadline == min(now + timeout, start + lifetime)
