"""The HTTP interface's query/data splitter: where the query text ends and data begins."""

from __future__ import annotations

import pytest

from fleetlens.warehouse.server import sql


def test_native_data_starts_after_one_newline():
    body = b"INSERT INTO t (a, b) FORMAT Native\n\n\x02\x01"  # data itself starts with a newline byte
    split = sql.split_insert(body, complete=True)
    assert split.statement == "INSERT INTO t (a, b)" and split.input_format == "Native"
    assert body[split.data_offset:] == b"\n\x02\x01"


def test_crlf_and_spaces_after_format():
    body = b"insert into t format TSV  \r\n1\tx\n"
    split = sql.split_insert(body, complete=True)
    assert split.input_format == "TSV" and body[split.data_offset:] == b"1\tx\n"


def test_keywords_inside_strings_comments_and_parens_are_ignored():
    body = (b"INSERT INTO FUNCTION file('FORMAT CSV', 'TSV') /* FORMAT JSON */ -- VALUES\n"
            b"SETTINGS x = 'VALUES' FORMAT JSONEachRow\n{\"a\":1}")
    split = sql.split_insert(body, complete=True)
    assert split.input_format == "JSONEachRow" and body[split.data_offset:] == b'{"a":1}'


def test_values_and_insert_select():
    split = sql.split_insert(b"INSERT INTO t VALUES (1, 'a'), (2, 'b')", complete=True)
    assert split.input_format == "Values" and split.statement == "INSERT INTO t"
    assert sql.split_insert(b"INSERT INTO t SELECT 1", complete=True).input_format is None


@pytest.mark.parametrize("cut", range(1, 30))
def test_incomplete_head_asks_for_more(cut):
    body = b"INSERT INTO t FORMAT Native\n\x01\x02"
    head = body[:cut]
    if cut < len(b"INSERT INTO t FORMAT Native\n"):
        with pytest.raises(sql.NeedMoreData):
            sql.split_insert(head, complete=False)
    else:
        assert sql.split_insert(head, complete=False).data_offset == len(b"INSERT INTO t FORMAT Native\n")


def test_output_format_and_kind():
    assert sql.output_format(b"SELECT 'FORMAT CSV' FROM t FORMAT JSONEachRow") == "JSONEachRow"
    assert sql.output_format(b"SELECT (SELECT 1) AS x") is None
    assert sql.statement_kind(b"  (SELECT 1)") == "SELECT"
    assert sql.statement_kind(b"-- c\nWITH 1 AS x SELECT x") == "WITH"


def test_statement_kind_waits_for_a_complete_keyword():
    for head in (b"", b"  ", b"-- comment", b"(", b"INS"):
        with pytest.raises(sql.NeedMoreData):
            sql.statement_kind(head, complete=False)
    assert sql.statement_kind(b"INSERT ", complete=False) == "INSERT"
    assert sql.statement_kind(b"", complete=True) == ""
