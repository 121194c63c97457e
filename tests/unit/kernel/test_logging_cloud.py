"""The logger as Cloud Logging and the standard ``logging`` module see it.

Lines: Cloud Logging's structured JSON (https://cloud.google.com/logging/docs/structured-logging)
with ``severity``, ``message``, ``time``, ``logging.googleapis.com/labels`` and, while a request
with a trace is served, its trace fields. Records: ``tokenbroker.<component>`` loggers whose
levels, filters, handlers and propagation work as for any logger, with the redacted fields as
record attributes. And the hot path: no record is made while our handler alone listens.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import restore_session_logging
from tests.support.logs import ROUTES, TRACE_KEYS, Records, Route, only_ours
from tokenbroker.kernel import log as kernel_log
from tokenbroker.kernel import trace
from tokenbroker.kernel.errors import InvalidGrant
from tokenbroker.kernel.log import (
    CloudLoggingFormatter,
    capture_logs,
    configure_logging,
    flush,
    get_logger,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.kernel.trace import TraceContext

VALUE = "rt-Zk3mQ9vX2pL7wR4tY8uB1nC6"
JWT = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ3b3JrZXIifQ.c2lnbmF0dXJlLXZhbHVlLWhlcmU"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CONTEXT = TraceContext(TRACE_ID, "00f067aa0ba902b7", True)
TRACE_FIELDS = {
    "logging.googleapis.com/trace": f"projects/tb-proj/traces/{TRACE_ID}",
    "logging.googleapis.com/spanId": "00f067aa0ba902b7",
    "logging.googleapis.com/trace_sampled": True,
}


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def every_kind_of_line(component: str = "test") -> None:
    """One line of each way the library writes one."""
    log = get_logger(component=component, connection="crm")
    log.debug("debugging")
    log.info("informing", refresh_token=VALUE)
    log.warning("warning", secret=Secret(VALUE))
    failing = f"failing {JWT}"  # a token in a message: scrubbed
    log.error(failing)
    try:
        raise InvalidGrant(f"provider said {JWT}")
    except InvalidGrant:
        log.exception("crashed")
    line = log.template("info", "token decision", numbers=("expires_in", "latency_ms"))
    line.emit_values(900, 0.25)
    line.emit(expires_in=1, latency_ms=None)


@pytest.fixture(params=sorted(ROUTES))
def route(request: pytest.FixtureRequest) -> Route:
    """Each test of the line both ways: straight to the sink, and as a record through
    ``logging`` and CloudLoggingFormatter."""
    return ROUTES[request.param]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("tokenbroker.test")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- the line ------------------------------------------------------------------------------------


def test_every_line_is_cloud_logging_json_with_severity_message_time_and_labels(
    route: Route,
) -> None:
    with route(), capture_logs("debug", project="tb-proj", service="tokenbroker-issuer") as stream:
        every_kind_of_line()
    lines = lines_of(stream)
    assert [line["severity"] for line in lines] == [
        "DEBUG", "INFO", "WARNING", "ERROR", "ERROR", "INFO", "INFO",
    ]  # fmt: skip
    for line in lines:
        assert isinstance(line["message"], str) and line["message"]
        assert line["time"].endswith("Z") and len(line["time"]) == len(
            "2026-01-01T00:00:00.000000Z"
        )
        assert line["logging.googleapis.com/labels"] == {
            "component": "test", "function": "tokenbroker-issuer",
        }  # fmt: skip
        assert not TRACE_KEYS & set(line)  # no request, no trace
    assert "Traceback (most recent call last)" in lines[4]["exception"]
    assert (lines[5]["expires_in"], lines[5]["latency_ms"]) == (900, 0.25)
    assert stream.getvalue().count(VALUE) == 0 and JWT not in stream.getvalue()


def test_a_time_is_rfc3339_utc_with_microseconds() -> None:
    assert kernel_log._stamp(0.0) == "1970-01-01T00:00:00.000000Z"
    assert kernel_log._stamp(1_700_000_000.000001) == "2023-11-14T22:13:20.000001Z"
    assert kernel_log._stamp(1_700_000_000.999999) == "2023-11-14T22:13:20.999999Z"
    now = kernel_log._stamp()
    assert (
        abs(time.mktime(time.strptime(now[:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime()))
        < 5
    )


def test_lines_written_for_a_traced_request_carry_its_trace_and_no_line_after_it(
    route: Route,
) -> None:
    with route(), capture_logs("debug", project="tb-proj") as stream:
        token = trace.enter(CONTEXT)
        try:
            every_kind_of_line()
        finally:
            trace.leave(token)
        every_kind_of_line()
    lines = lines_of(stream)
    assert len(lines) == 14
    for line in lines[:7]:
        assert {key: line[key] for key in TRACE_KEYS} == TRACE_FIELDS
    for line in lines[7:]:
        assert not TRACE_KEYS & set(line)


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (TraceContext(TRACE_ID, None, None), {"logging.googleapis.com/trace"}),
        (TraceContext(TRACE_ID, "000000000000004a", False), TRACE_KEYS),
    ],
)
def test_a_trace_without_a_span_or_a_sampling_decision_writes_what_it_has(
    context: TraceContext, expected: set[str], route: Route
) -> None:
    with route(), capture_logs(project="tb-proj") as stream:
        token = trace.enter(context)
        try:
            get_logger(component="test").info("x")
            get_logger(component="test").template("info", "y").emit_values()
        finally:
            trace.leave(token)
    for line in lines_of(stream):
        assert TRACE_KEYS & set(line) == expected
        if "logging.googleapis.com/trace_sampled" in line:
            assert line["logging.googleapis.com/trace_sampled"] is False


def test_without_a_project_lines_carry_no_trace_fields(
    route: Route,
) -> None:
    """The trace's name is ``projects/PROJECT_ID/traces/TRACE_ID``
    (https://cloud.google.com/trace/docs/trace-log-integration): no project, no trace."""
    configure_logging("info", stream=(stream := io.StringIO()))
    try:
        with route():
            token = trace.enter(CONTEXT)
            try:
                every_kind_of_line()
            finally:
                trace.leave(token)
    finally:
        restore_session_logging()
    for line in lines_of(stream):
        assert not TRACE_KEYS & set(line)
        assert line["logging.googleapis.com/labels"] == {"component": "test"}


# --- records: the standard logging module --------------------------------------------------------


def test_an_applications_handler_sees_records_with_the_fields_redacted(records: Records) -> None:
    with capture_logs("debug", project="tb-proj", service="fn") as stream:
        token = trace.enter(CONTEXT)
        try:
            every_kind_of_line()
        finally:
            trace.leave(token)
    got = records.records
    assert [r.levelname for r in got] == [
        "DEBUG", "INFO", "WARNING", "ERROR", "ERROR", "INFO", "INFO",
    ]  # fmt: skip
    assert all(r.name == "tokenbroker.test" for r in got)
    info = got[1]
    assert info.getMessage() == "informing"
    assert info.fields == {"component": "test", "connection": "crm", "refresh_token": "[REDACTED]"}
    assert info.labels == {"component": "test", "function": "fn"}
    assert info.trace == CONTEXT
    assert info.pathname == __file__ and info.funcName == "every_kind_of_line"
    assert got[2].fields["secret"].startswith("Secret(sha256:")
    assert got[3].getMessage() == "failing [REDACTED]"
    crashed = got[4]
    assert crashed.exc_info is None  # the exception itself (its text unscrubbed) never goes out
    assert "InvalidGrant: provider said [REDACTED]" in crashed.exc_text
    assert got[5].fields["expires_in"] == 900 and got[5].routine is True
    assert got[6].fields["latency_ms"] is None
    # An ordinary formatter prints what the record holds: nothing secret.
    text = "\n".join(logging.Formatter("%(levelname)s %(message)s").format(r) for r in got)
    assert VALUE not in text and JWT not in text and "Traceback" in text
    # And our handler wrote the same lines as ever.
    lines = lines_of(stream)
    assert len(lines) == 7 and all(set(line) >= TRACE_KEYS for line in lines)
    assert VALUE not in stream.getvalue() and JWT not in stream.getvalue()


def test_the_line_is_the_same_whether_a_record_is_made_or_not(records: Records) -> None:
    """With someone else listening, the line comes from the record through
    CloudLoggingFormatter; alone, it is rendered straight to the sink: the same line."""
    logger = logging.getLogger("tokenbroker.test")
    logger.removeHandler(records)
    with only_ours(), capture_logs("debug", project="tb-proj", service="fn") as alone:
        token = trace.enter(CONTEXT)
        try:
            every_kind_of_line()
        finally:
            trace.leave(token)
    logger.addHandler(records)
    with capture_logs("debug", project="tb-proj", service="fn") as recorded:
        token = trace.enter(CONTEXT)
        try:
            every_kind_of_line()
        finally:
            trace.leave(token)
    assert len(records.records) == 7

    def comparable(line: dict[str, Any]) -> dict[str, Any]:
        line = {key: value for key, value in line.items() if key != "time"}
        if "exception" in line:  # the traceback's line numbers differ; its shape does not
            line["exception"] = line["exception"].splitlines()[-1]
        return line

    assert [comparable(x) for x in lines_of(alone)] == [comparable(x) for x in lines_of(recorded)]


def test_no_record_is_made_while_our_handler_alone_listens(records: Records) -> None:
    """The hot path: the issuer's audit line (LineTemplate) and every other line skip the
    LogRecord when nobody else would see it, and make one as soon as somebody would."""
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(counting)
    try:
        logger = logging.getLogger("tokenbroker.test")
        logger.removeHandler(records)
        with only_ours(), capture_logs("debug") as stream:
            every_kind_of_line()
            assert made == []
            assert len(stream.getvalue().splitlines()) == 7
            logger.addHandler(records)  # the application starts listening
            every_kind_of_line()
            assert len(made) == 7 == len(records.records)
            logger.removeHandler(records)
            every_kind_of_line()
            assert len(made) == 7
        assert len(stream.getvalue().splitlines()) == 21
    finally:
        logging.setLogRecordFactory(factory)


def test_levels_set_on_a_components_logger_take_effect(
    route: Route,
) -> None:
    issuer = logging.getLogger("tokenbroker.issuer")
    with route(), capture_logs("debug") as stream:
        issuer.setLevel(logging.WARNING)
        try:
            get_logger(component="issuer").info("hidden")
            get_logger(component="issuer").template("info", "hidden too").emit_values()
            get_logger(component="issuer").warning("shown")
            get_logger(component="relay").info("another component is not affected")
        finally:
            issuer.setLevel(logging.NOTSET)
        get_logger(component="issuer").info("and back")
    assert [line["message"] for line in lines_of(stream)] == [
        "shown", "another component is not affected", "and back",
    ]  # fmt: skip


def test_the_configured_level_is_the_tokenbroker_loggers_level() -> None:
    configure_logging("warning", stream=(stream := io.StringIO()))
    try:
        assert logging.getLogger("tokenbroker").level == logging.WARNING
        assert not logging.getLogger("tokenbroker.issuer").isEnabledFor(logging.INFO)
        get_logger(component="issuer").info("hidden")
        logging.getLogger("tokenbroker").setLevel(logging.INFO)  # as an application may
        get_logger(component="issuer").info("shown")
    finally:
        restore_session_logging()
    assert [line["message"] for line in lines_of(stream)] == ["shown"]


def test_filters_on_the_loggers_or_on_our_handler_are_obeyed(records: Records) -> None:
    class NoSecrets(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "drop" not in record.getMessage()

    drop = NoSecrets()
    with only_ours(), capture_logs("debug") as stream:
        ours = logging.getLogger("tokenbroker").handlers
        (handler,) = [h for h in ours if isinstance(h, kernel_log._SinkHandler)]
        assert handler.plain
        logging.getLogger("tokenbroker.test").addFilter(drop)
        get_logger(component="test").info("drop: at the logger")
        get_logger(component="test").template("info", "drop: a template").emit_values()
        logging.getLogger("tokenbroker.test").removeFilter(drop)
        handler.addFilter(drop)
        assert not handler.plain
        get_logger(component="other").info("drop: at our handler")
        get_logger(component="test").info("kept")
        handler.removeFilter(drop)
        assert handler.plain
        handler.filters.append(drop)  # even behind addFilter's back
        assert not handler.plain
        get_logger(component="other").info("drop: appended")
        handler.filters.clear()
        assert handler.plain
    assert [line["message"] for line in lines_of(stream)] == ["kept"]
    # The application's handler sits below the logger's filter, not below our handler's.
    assert [r.getMessage() for r in records.records] == ["kept"]


def test_a_disabled_logger_writes_nothing(
    route: Route,
) -> None:
    """``logging.config.dictConfig`` disables existing loggers unless told otherwise."""
    with route(), capture_logs() as stream:
        logger = logging.getLogger("tokenbroker.test")
        logger.disabled = True
        try:
            get_logger(component="test").info("hidden")
            get_logger(component="test").template("info", "hidden").emit_values()
        finally:
            logger.disabled = False
        get_logger(component="test").info("shown")
    assert [line["message"] for line in lines_of(stream)] == ["shown"]


def test_propagation_to_the_root_logger_is_off_unless_asked_for() -> None:
    root_records = Records()
    logging.getLogger().addHandler(root_records)
    try:
        configure_logging("info", stream=(default := io.StringIO()))
        get_logger(component="test").info("ours only")
        assert root_records.records == []
        configure_logging("info", stream=(opted := io.StringIO()), propagate=True)
        assert logging.getLogger("tokenbroker").propagate is True
        get_logger(component="test").info("both")
        get_logger(component="test").template("info", "both, a template").emit_values()
    finally:
        logging.getLogger().removeHandler(root_records)
        restore_session_logging()
    assert logging.getLogger("tokenbroker").propagate is False
    assert [line["message"] for line in lines_of(default)] == ["ours only"]
    assert [line["message"] for line in lines_of(opted)] == ["both", "both, a template"]
    assert [r.getMessage() for r in root_records.records] == ["both", "both, a template"]


def test_reconfiguring_replaces_our_handler_and_keeps_the_applications(records: Records) -> None:
    root = logging.getLogger("tokenbroker")
    theirs = Records()
    root.addHandler(theirs)
    try:
        configure_logging("info", stream=io.StringIO())
        configure_logging("info", stream=(second := io.StringIO()))
        ours = [h for h in root.handlers if isinstance(h, kernel_log._SinkHandler)]
        assert len(ours) == 1 and theirs in root.handlers
        get_logger(component="test").info("hello")
    finally:
        root.removeHandler(theirs)
        restore_session_logging()
    assert [line["message"] for line in lines_of(second)] == ["hello"]
    assert [r.getMessage() for r in theirs.records] == ["hello"]


def test_an_application_that_handles_the_tokenbroker_logger_itself_is_left_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No configure_logging: the first line configures stderr -- unless the application has
    put handlers on ``tokenbroker``, which then do the logging alone."""
    root = logging.getLogger("tokenbroker")
    saved = (list(root.handlers), root.level, root.propagate)
    monkeypatch.setattr(kernel_log, "_config", None)
    theirs = Records()
    root.handlers[:] = [theirs]
    root.setLevel(logging.INFO)
    try:
        get_logger(component="test").info("to the application", refresh_token=VALUE)
        get_logger(component="test").template("info", "a template").emit_values()
        assert [r.getMessage() for r in theirs.records] == ["to the application", "a template"]
        assert theirs.records[0].fields["refresh_token"] == "[REDACTED]"
        assert root.handlers == [theirs]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        root.propagate = saved[2]
        monkeypatch.undo()
        restore_session_logging()


def test_the_formatter_renders_any_records_line_redacted() -> None:
    """Another library's record (or the application's own, through our loggers): scrubbed
    message and traceback, the component from the logger's name."""
    formatter = CloudLoggingFormatter(project="tb-proj", labels={"function": "fn"})
    try:
        raise ValueError(f"bad {JWT}")
    except ValueError as error:
        record = logging.LogRecord(
            "tokenbroker.relay", logging.WARNING, __file__, 1, "saw %s", (JWT,),
            (type(error), error, error.__traceback__),
        )  # fmt: skip
    token = trace.enter(CONTEXT)
    try:
        line = json.loads(formatter.format(record))
    finally:
        trace.leave(token)
    assert line["message"] == "saw [REDACTED]"
    assert line["severity"] == "WARNING"
    assert "ValueError: bad [REDACTED]" in line["exception"] and JWT not in json.dumps(line)
    assert line["logging.googleapis.com/labels"] == {"component": "relay", "function": "fn"}
    assert {key: line[key] for key in TRACE_KEYS} == TRACE_FIELDS
    other = logging.LogRecord("urllib3", 25, __file__, 1, "custom level", (), None)
    rendered = json.loads(CloudLoggingFormatter().format(other))
    assert rendered["severity"] == "INFO"  # level 25 rounds down
    assert rendered["logging.googleapis.com/labels"] == {"component": "urllib3"}
    assert not TRACE_KEYS & set(rendered)  # no project configured


def test_the_line_reaches_an_applications_handler_through_our_formatter() -> None:
    """An application writing our lines somewhere else uses the same formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(CloudLoggingFormatter(project="tb-proj"))
    logger = logging.getLogger("tokenbroker.test")
    logger.addHandler(handler)
    try:
        with capture_logs(project="tb-proj") as ours:
            token = trace.enter(CONTEXT)
            try:
                get_logger(component="test").info("hello", secret=Secret(VALUE))
            finally:
                trace.leave(token)
    finally:
        logger.removeHandler(handler)
    (theirs,), (mine,) = lines_of(stream), lines_of(ours)
    assert theirs == mine


# --- the sink: threads, forks ---------------------------------------------------------------------


def test_lines_written_from_many_threads_never_interleave(tmp_path: Path) -> None:
    """Through the batching sink (a file) and through records (an application's handler is
    listening on one of the components): whole lines, each with its own thread's trace."""
    log_file = tmp_path / "threads.log"
    listening = Records()
    logging.getLogger("tokenbroker.t1").addHandler(listening)
    configure_logging("info", stream=open(os.devnull, "w"), log_file=log_file, project="p")  # noqa: SIM115
    threads_count, per_thread = 8, 300

    def work(n: int) -> None:
        token = trace.enter(TraceContext(f"{n + 1:032x}", f"{n + 1:016x}", n % 2 == 0))
        try:
            log = get_logger(component=f"t{n}", thread=n, padding="x" * (50 * n))
            line = log.template("info", "routine", numbers=("i",))
            for i in range(per_thread):
                line.emit_values(i)
                if i % 10 == 0:
                    log.warning("not routine", i=i)
        finally:
            trace.leave(token)

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        flush()
    finally:
        logging.getLogger("tokenbroker.t1").removeHandler(listening)
        restore_session_logging()
    lines = [json.loads(text) for text in log_file.read_text().splitlines()]
    assert len(lines) == threads_count * (per_thread + per_thread // 10)
    for line in lines:
        n = line["thread"]
        assert line["logging.googleapis.com/trace"] == f"projects/p/traces/{n + 1:032x}"
        assert line["logging.googleapis.com/labels"]["component"] == f"t{n}"
    counts = [sum(1 for x in lines if x["thread"] == n and x["message"] == "routine")
              for n in range(threads_count)]  # fmt: skip
    assert counts == [per_thread] * threads_count
    assert len(listening.records) == per_thread + per_thread // 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_logs_through_a_fresh_sink_and_never_repeats_the_parents_lines(
    tmp_path: Path,
) -> None:
    """gunicorn forks its workers: the child has the parent's sink but not its flusher
    thread. Lines the parent had waiting are written once (by the parent); the child's own
    routine lines are batched and written by its own flusher."""
    log_file = tmp_path / "fork.log"
    configure_logging("info", stream=open(os.devnull, "w"), log_file=log_file)  # noqa: SIM115
    try:
        line = get_logger(component="test").template("info", "routine", numbers=("pid",))
        for _ in range(3):
            line.emit_values(os.getpid())  # waiting in the batch at the fork
        pid = os.fork()
        if pid == 0:  # the child: no flush, no atexit -- only its flusher thread writes
            try:
                line.emit_values(os.getpid())
                get_logger(component="test").info("child", pid=os.getpid())
                time.sleep(kernel_log.BATCH_SECONDS * 6)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        flush()
    finally:
        restore_session_logging()
    lines = [json.loads(text) for text in log_file.read_text().splitlines()]
    parent = [x for x in lines if x.get("pid") != pid]
    child = [x for x in lines if x.get("pid") == pid]
    assert [x["message"] for x in parent] == ["routine"] * 3
    assert sorted(x["message"] for x in child) == ["child", "routine"]


def test_a_record_for_a_broken_destination_never_fails_the_caller(records: Records) -> None:
    """Through records too (an application's handler listening): the sink drops the line."""

    class FullDisk(io.StringIO):
        def write(self, _text: str) -> int:
            raise OSError(28, "No space left on device")

    try:
        configure_logging("info", stream=FullDisk())
        get_logger(component="test").warning("store call retrying", attempt=1)
        get_logger(component="test").template("info", "routine").emit_values()
    finally:
        restore_session_logging()
    assert len(records.records) == 2
