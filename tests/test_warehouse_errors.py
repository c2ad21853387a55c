"""Bad input gets a ClickHouse-style error, and the server answers the next query."""

from __future__ import annotations

import gzip
import subprocess
import sys
import zlib

import clickhouse_connect
import httpx
import lz4.frame
import pytest
import zstandard
from clickhouse_connect.driver.exceptions import DatabaseError

from conftest import child_env

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A password-protected server with a small body limit."""
    from conftest import WarehouseProcess, free_port

    wh = WarehouseProcess(tmp_path_factory.mktemp("limited") / "wh", free_port(), password="s3cret!",
                          env={"FLEETLENS_WAREHOUSE_SERVER__MAX_BODY_BYTES": str(LIMIT)}).start()
    c = wh.client()
    c.command("CREATE TABLE IF NOT EXISTS t (a UInt64, b String) ENGINE = MergeTree ORDER BY a")
    yield wh
    wh.stop()


def post(wh, body: bytes, params: dict | None = None, headers: dict | None = None, auth=("default", "s3cret!")):
    return httpx.post(f"{wh.url}/", content=body, params=params or {}, headers=headers or {}, auth=auth, timeout=30)


def assert_clickhouse_error(response: httpx.Response, status: int, name: str) -> None:
    assert response.status_code == status, response.text
    code = response.headers["X-ClickHouse-Exception-Code"]
    assert response.text.startswith(f"Code: {code}. DB::Exception: "), response.text
    assert f"({name})" in response.text, response.text


def assert_alive(wh) -> None:
    assert post(wh, b"SELECT 40 + 2").text == "42\n"


def test_malformed_sql(limited):
    assert_clickhouse_error(post(limited, b"SELEC 1"), 400, "SYNTAX_ERROR")
    assert_alive(limited)


def test_unknown_table(limited):
    assert_clickhouse_error(post(limited, b"SELECT * FROM no_such_table"), 404, "UNKNOWN_TABLE")
    assert_clickhouse_error(post(limited, b"SELECT 1", params={"database": "nope"}), 404, "UNKNOWN_DATABASE")
    assert_alive(limited)


def test_wrong_or_missing_password(limited):
    assert_clickhouse_error(post(limited, b"SELECT 1", auth=("default", "wrong")), 403, "AUTHENTICATION_FAILED")
    assert_clickhouse_error(post(limited, b"SELECT 1", auth=("mallory", "s3cret!")), 403, "AUTHENTICATION_FAILED")
    missing = post(limited, b"SELECT 1", auth=None)
    assert_clickhouse_error(missing, 401, "REQUIRED_PASSWORD")
    assert "WWW-Authenticate" in missing.headers
    # the other ways ClickHouse clients authenticate
    assert post(limited, b"SELECT 1", auth=None,
                headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": "s3cret!"}).text == "1\n"
    assert post(limited, b"SELECT 1", auth=None, params={"user": "default", "password": "s3cret!"}).text == "1\n"
    with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
        clickhouse_connect.get_client(host="127.0.0.1", port=limited.port, password="nope")
    assert_alive(limited)


def test_ping_needs_no_password(limited):
    assert httpx.get(f"{limited.url}/ping").text == "Ok.\n"
    assert httpx.get(f"{limited.url}/replicas_status").text == "Ok.\n"


def test_body_over_limit_is_413(limited):
    big = b"INSERT INTO t FORMAT TSV\n" + b"1\tx\n" * (LIMIT // 4 + 10)
    assert_clickhouse_error(post(limited, big), 413, "QUERY_IS_TOO_LARGE")

    def chunked():  # no Content-Length: the limit is enforced while streaming
        for _ in range(LIMIT // 4096 + 10):
            yield b"1\tx\n" * 1024

    response = httpx.post(f"{limited.url}/", params={"query": "INSERT INTO t FORMAT TSV"}, content=chunked(),
                          auth=("default", "s3cret!"), timeout=30)
    assert_clickhouse_error(response, 413, "QUERY_IS_TOO_LARGE")
    assert_alive(limited)


def test_compression_bomb_is_cut_off(limited):
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < LIMIT
    response = post(limited, bomb, params={"query": "INSERT INTO t FORMAT TSV"}, headers={"Content-Encoding": "gzip"})
    assert_clickhouse_error(response, 413, "QUERY_IS_TOO_LARGE")
    assert_alive(limited)


def test_truncated_native_body(limited):
    native = post(limited, b"SELECT number AS a, toString(number) AS b FROM numbers(1000) FORMAT Native").content
    before = post(limited, b"SELECT count() FROM t").text
    response = post(limited, b"INSERT INTO t FORMAT Native\n" + native[: len(native) // 2])
    assert_clickhouse_error(response, 500, "CANNOT_READ_ALL_DATA")
    assert post(limited, b"SELECT count() FROM t").text == before  # nothing half-written
    assert_alive(limited)


def test_bad_rows_and_unknown_things(limited):
    assert_clickhouse_error(post(limited, b"INSERT INTO t FORMAT TSV\nnot-a-number\tx\n"), 400,
                            "CANNOT_PARSE_INPUT_ASSERTION_FAILED")
    assert_clickhouse_error(post(limited, b"SELECT 1", params={"no_such_setting": "1"}), 404, "UNKNOWN_SETTING")
    assert_clickhouse_error(post(limited, b"SELECT 1 FORMAT NoSuchFormat"), 404, "UNKNOWN_FORMAT")
    assert_clickhouse_error(post(limited, b""), 400, "SYNTAX_ERROR")
    assert_clickhouse_error(post(limited, b"SELECT 1", headers={"Content-Encoding": "snappy-ish"}), 500,
                            "UNKNOWN_COMPRESSION_METHOD")
    assert_clickhouse_error(post(limited, b"not gzip at all", headers={"Content-Encoding": "gzip"}), 500,
                            "CANNOT_DECOMPRESS")
    assert_clickhouse_error(post(limited, b"SELECT 1", params={"compress": "1"}), 501, "NOT_IMPLEMENTED")
    assert_alive(limited)


def test_error_mid_stream_ends_the_body(limited):
    response = post(limited, b"SELECT throwIf(number = 200000) FROM numbers(400000)")
    # headers went out with the first block; the error text ends the body, as in ClickHouse
    assert response.status_code == 200
    assert "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO" in response.text[-2000:]
    assert_alive(limited)


def test_get_is_read_only(limited):
    response = httpx.get(f"{limited.url}/", params={"query": "CREATE TABLE g (a UInt8) ENGINE = Memory"},
                         auth=("default", "s3cret!"))
    assert response.status_code == 500 and "READONLY" in response.text
    assert httpx.get(f"{limited.url}/", params={"query": "SELECT 1"}, auth=("default", "s3cret!")).text == "1\n"


@pytest.mark.parametrize("encoding,decompress", [
    ("gzip", gzip.decompress),
    ("deflate", zlib.decompress),
    ("zstd", lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)),
    ("lz4", lz4.frame.decompress),
])
def test_request_and_response_compression(limited, encoding, decompress):
    compressors = {"gzip": gzip.compress, "deflate": zlib.compress,
                   "zstd": zstandard.ZstdCompressor().compress, "lz4": lz4.frame.compress}
    query = b"SELECT number FROM numbers(100000) FORMAT TSV"
    with httpx.Client(auth=("default", "s3cret!")) as http:
        request = http.build_request("POST", f"{limited.url}/", params={"enable_http_compression": "1"},
                                     content=compressors[encoding](query),
                                     headers={"Content-Encoding": encoding, "Accept-Encoding": encoding})
        response = http.send(request, stream=True)
        raw = b"".join(response.iter_raw())
    assert response.headers["Content-Encoding"] == encoding
    expected = "".join(f"{i}\n" for i in range(100000)).encode()
    assert decompress(raw) == expected


def test_non_loopback_bind_without_password_is_refused(tmp_path):
    env = child_env()
    result = subprocess.run([sys.executable, "-m", "fleetlens", "warehouse", "serve", "--host", "0.0.0.0",
                             "--path", str(tmp_path / "wh"), "--port", "1"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "needs a password" in result.stderr
    assert not (tmp_path / "wh").exists()  # refused before touching anything


def test_second_process_on_same_path_fails_clearly(limited):
    result = subprocess.run([sys.executable, "-m", "fleetlens", "warehouse", "serve", "--path", str(limited.path),
                             "--port", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cannot open the warehouse" in (result.stderr + result.stdout)


def test_insert_failing_at_commit_is_an_error_not_a_silent_loss(limited):
    """chDB's streaming insert swallows errors raised when rows are committed (it returns as if all
    rows were written); the server must still answer with the engine's error."""
    data = "".join(f"2020-{1 + i // 28:02d}-{1 + i % 28:02d}\t{i}\n" for i in range(101)).encode()  # 101 days
    post(limited, b"CREATE TABLE IF NOT EXISTS by_day (d Date, x UInt32) ENGINE = MergeTree PARTITION BY d ORDER BY x")
    post(limited, b"CREATE TABLE IF NOT EXISTS checked (x UInt32, CONSTRAINT positive CHECK x > 5) "
                  b"ENGINE = MergeTree ORDER BY x")
    too_many = post(limited, data, params={"query": "INSERT INTO by_day FORMAT TSV"})
    assert_clickhouse_error(too_many, 500, "TOO_MANY_PARTS")
    violated = post(limited, b"1\n2\n", params={"query": "INSERT INTO checked FORMAT TSV"})
    assert_clickhouse_error(violated, 500, "VIOLATED_CONSTRAINT")
    assert post(limited, b"SELECT count() FROM by_day").text == "0\n"
    assert post(limited, b"SELECT count() FROM checked").text == "0\n"
    # the same data with the limit lifted is written, and the answer says so
    ok = post(limited, data, params={"query": "INSERT INTO by_day FORMAT TSV",
                                     "max_partitions_per_insert_block": "0"})
    assert ok.status_code == 200, ok.text
    assert post(limited, b"SELECT count() FROM by_day").text == "101\n"
    assert_alive(limited)
