"""Upload bombs against a real `kiln up` process: its memory stays bounded, limits are 413s.

Each server is the real one (``kiln up --workers 0`` in a subprocess, over HTTP); the
test samples the server process's resident memory in a thread while an upload runs and
asserts how much it grew (never how long anything took). The bombs are made here:

- a Parquet file of 250 million int32 zeros in 50 row groups, under 1 MB on disk
  (RLE/dictionary pages, zstd); read whole (as kiln did) it took the process +2 GiB;
- a ``.csv.gz`` that inflates a thousandfold (concatenated gzip members, each a
  megabyte of one repeated row).

With the default limits the Parquet footer alone refuses the first; with the row and
cell limits raised it is streamed, accepted, and the server still stays far under 1 GiB.
Interrupted and refused uploads leave nothing under ``$KILN_HOME/scratch``, and what a
killed process left there is removed at the next start. A ``Content-Encoding: gzip``
body is not a bomb: nothing in the stack inflates it.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from support import free_port, kiln_env, start_process, stop_process, wait_for, wait_for_http

pytestmark = pytest.mark.e2e  # `kiln up` processes

API = "/api/v1"
GIB = 1 << 30
BOMB_ROWS = 250_000_000
SMALL = b"x1,x2,label\n1.0,2.0,a\n3.0,4.0,b\n"


class Server:
    """A `kiln up --workers 0` process with ``env`` (KILN_* settings) and a client."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.log = home.parent / f"{home.name}.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        clean = kiln_env(home, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
        command = "from kiln.cli.main import main; main()"  # our own interpreter and module
        args = [sys.executable, "-c", command, "up", "--port", str(port), "--workers", "0"]
        self.proc = start_process(args, self.log, clean)
        wait_for_http(f"{self.url}/healthz", proc=self.proc, log=self.log, timeout=120)
        self.key = (home / "admin.key").read_text().strip()
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=300
        )
        self.process = psutil.Process(self.proc.pid)

    def upload(self, data: bytes, filename: str) -> httpx.Response:
        return self.client.post(
            f"{API}/datasets", files={"file": (filename, data, "application/octet-stream")}
        )

    def dataset_count(self) -> int:
        r = self.client.get(f"{API}/datasets")
        assert r.status_code == 200, r.text
        return int(r.json()["total"])

    def dataset_files(self) -> list[Path]:
        return [
            p for p in (self.home / "artifacts").rglob("*") if p.is_file() and "datasets" in p.parts
        ]

    def uploads_in_scratch(self) -> list[Path]:
        return list((self.home / "scratch").rglob("kiln-upload-*"))

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def peak_growth(self, call: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
        """``call()``'s response and how far the server's RSS rose above where it was."""
        base = self.rss()
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self.rss())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            response = call()
        finally:
            done.set()
            sampler.join()
        peak = max(peak, self.rss())
        print(f"server RSS: {base / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB")
        return response, peak - base

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc, signal.SIGTERM, timeout=30)


def _warm(server: Server) -> None:
    """Upload one small table of each kind, so pandas and pyarrow are in the baseline."""
    import io

    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).to_parquet(buf)
    for filename, data in (
        ("warm.csv", SMALL),
        ("warm.parquet", buf.getvalue()),
        ("warm.csv.gz", gzip.compress(SMALL)),
    ):
        r = server.upload(data, filename)
        assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("bombs")
    group = 5_000_000
    zeros = pa.table({"x": pa.array(np.zeros(group, dtype=np.int32))})
    with pq.ParquetWriter(folder / "bomb.parquet", zeros.schema, compression="zstd") as writer:
        for _ in range(BOMB_ROWS // group):
            writer.write_table(zeros, row_group_size=group)
    # gzip members concatenate into one valid stream: 1 MiB of rows, compressed once
    row_block = gzip.compress((b"a" * 1023 + b"\n") * 1024, compresslevel=9)
    zero_block = gzip.compress(b"0\n" * (1 << 19), compresslevel=9)
    # one 1 MiB string, repeated by dictionary index: rows x 1 MiB once expanded
    value = pa.array(["x" * (1 << 20)])
    for rows in (900, 3000):
        strings = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), value)
        # without the stored arrow schema a reader sees a plain string column
        pq.write_table(pa.table({"s": strings}), folder / f"dict{rows}.parquet", store_schema=False)
    wide_row = gzip.compress(b"x" * (1 << 20) + b"\n", compresslevel=9)
    return {
        "parquet": (folder / "bomb.parquet").read_bytes(),
        "dict900": (folder / "dict900.parquet").read_bytes(),
        "dict3000": (folder / "dict3000.parquet").read_bytes(),
        "wide_rows": gzip.compress(b"text\n") + wide_row * 600,  # 600 rows of 1 MiB
        "gzip_wide": gzip.compress(b"text\n") + row_block * 4096,  # 4 GiB of 1 KiB rows
        "gzip_rows": gzip.compress(b"n\n") + zero_block * 4096,  # 4 GiB of "0" rows
    }


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("up") / "home")
    _warm(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def raised_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Row and cell limits raised past the bomb's; the decompressed cap at 1 GiB."""
    server = Server(
        tmp_path_factory.mktemp("up-raised") / "home",
        KILN_MAX_DATASET_ROWS="1000000000",
        KILN_MAX_DATASET_CELLS="1000000000",
        KILN_MAX_DECOMPRESSED_MB="1024",
    )
    _warm(server)
    yield server
    server.stop()


def _refused(server: Server, response: httpx.Response, limit: str, before: int) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "too_large" and error["field"] == "file"
    assert limit in error["message"]
    assert server.dataset_count() == before  # nothing stored ...
    assert server.uploads_in_scratch() == []  # ... and nothing left behind


def test_parquet_bomb_is_refused_by_its_footer(default_server: Server, bombs) -> None:
    assert len(bombs["parquet"]) < 2 << 20  # the whole bomb is under 2 MB
    before, files = default_server.dataset_count(), default_server.dataset_files()
    r, growth = default_server.peak_growth(
        lambda: default_server.upload(bombs["parquet"], "zeros.parquet")
    )
    _refused(default_server, r, "KILN_MAX_DATASET_ROWS", before)
    assert default_server.dataset_files() == files
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"


def test_parquet_bomb_within_raised_limits_is_streamed(raised_server: Server, bombs) -> None:
    r, growth = raised_server.peak_growth(
        lambda: raised_server.upload(bombs["parquet"], "zeros.parquet")
    )
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == BOMB_ROWS
    assert r.json()["columns"] == [{"name": "x", "kind": "numeric", "dtype": "int32"}]
    # read whole, these rows alone take over 1 GiB; streamed, a few batches at a time
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"
    assert raised_server.uploads_in_scratch() == []


def test_dictionary_bomb_is_counted_expanded_and_refused(default_server: Server, bombs) -> None:
    """3,000 rows of one 1 MiB string: a file of a few kB, 3 GiB once expanded."""
    assert len(bombs["dict3000"]) < 64 << 10
    before = default_server.dataset_count()
    r, growth = default_server.peak_growth(
        lambda: default_server.upload(bombs["dict3000"], "strings.parquet")
    )
    _refused(default_server, r, "KILN_MAX_DECOMPRESSED_MB", before)
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"


def test_dictionary_strings_within_the_limits_are_not_expanded(
    raised_server: Server, bombs
) -> None:
    """900 MiB once expanded, under the 1 GiB cap: accepted, and only a sample expanded."""
    r, growth = raised_server.peak_growth(
        lambda: raised_server.upload(bombs["dict900"], "strings.parquet")
    )
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 900
    assert r.json()["columns"][0]["kind"] == "categorical"
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"


def test_rows_of_a_mib_each_are_parsed_a_few_at_a_time(default_server: Server, bombs) -> None:
    """600 rows of 1 MiB (a 600 kB .csv.gz): chunks are bounded in bytes, not only rows."""
    r, growth = default_server.peak_growth(
        lambda: default_server.upload(bombs["wide_rows"], "wide_rows.csv.gz")
    )
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 600
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"


def test_gzip_bomb_stops_at_the_row_limit(default_server: Server, bombs) -> None:
    before = default_server.dataset_count()
    r, growth = default_server.peak_growth(
        lambda: default_server.upload(bombs["gzip_rows"], "zeros.csv.gz")
    )
    _refused(default_server, r, "KILN_MAX_DATASET_ROWS", before)
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"


def test_gzip_bomb_stops_at_the_decompressed_limit(raised_server: Server, bombs) -> None:
    assert len(bombs["gzip_wide"]) < 16 << 20  # 4 GiB once inflated
    before = raised_server.dataset_count()
    r, growth = raised_server.peak_growth(
        lambda: raised_server.upload(bombs["gzip_wide"], "wide.csv.gz")
    )
    _refused(raised_server, r, "KILN_MAX_DECOMPRESSED_MB", before)
    assert "1,024 MiB" in r.json()["error"]["message"]
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"


def test_one_endless_line_is_refused(default_server: Server) -> None:
    endless = gzip.compress(b"a\n") + gzip.compress(b"1" * (64 << 20), compresslevel=9)
    before = default_server.dataset_count()
    r, growth = default_server.peak_growth(lambda: default_server.upload(endless, "line.csv.gz"))
    assert r.status_code == 413, r.text
    assert "line longer than 32 MiB" in r.json()["error"]["message"]
    assert default_server.dataset_count() == before
    assert growth < GIB


def test_a_gzip_table_is_an_ordinary_dataset(default_server: Server) -> None:
    rows = b"x1,x2,label\n" + b"1.0,2.0,a\n3.0,4.0,b\n" * 20_000
    r = default_server.upload(gzip.compress(rows), "pairs.csv.gz")
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["format"] == "csv" and out["rows"] == 40_000
    assert [(c["name"], c["kind"]) for c in out["columns"]] == [
        ("x1", "numeric"),
        ("x2", "numeric"),
        ("label", "categorical"),
    ]


def test_an_interrupted_upload_leaves_nothing(default_server: Server) -> None:
    """The client sends half a 40 MB multipart body, then closes the connection."""
    boundary = "kilnbomb"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="cut.csv"\r\nContent-Type: text/csv\r\n\r\nx1,x2\r\n'
    ).encode()
    total = 40 << 20
    host, port = default_server.url.removeprefix("http://").split(":")
    already = set(_held_temp_files(default_server))

    def spooled() -> set[str]:
        return set(_held_temp_files(default_server)) - already

    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            (
                f"POST {API}/datasets HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {default_server.key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {total}\r\n\r\n"
            ).encode()
            + head
        )
        chunk = b"1.0,2.0\n" * 8192
        for _ in range((total // 2) // len(chunk)):
            sock.sendall(chunk)
        # the server holds the part so far in a spooled temporary file ...
        wait_for(spooled, timeout=120, what="the server to spool the body")
    # ... which is gone once it sees the client go, and nothing is in scratch either
    wait_for(lambda: not spooled(), timeout=120, what="the spool to close")
    assert default_server.uploads_in_scratch() == []
    assert default_server.upload(SMALL, "after.csv").status_code == 201


def _held_temp_files(server: Server) -> list[str]:
    """Files the server holds open that are deleted (an unnamed spool) or under scratch."""
    fds = Path(f"/proc/{server.proc.pid}/fd")
    held = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.endswith("(deleted)") or "/scratch/" in target:
                held.append(target)
    return [t for t in held if "memfd:" not in t and "/dev/shm" not in t]


def test_leftovers_of_a_killed_server_are_removed_at_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    started = int(psutil.Process().create_time() * 1000)
    dead = home / "scratch" / f"{gone.pid}-{started}" / "kiln-upload-abc123"
    dead.mkdir(parents=True)
    (dead / "upload").write_bytes(SMALL * 1000)
    mine = home / "scratch" / f"{os.getpid()}-{started}"  # this live process's: kept
    (mine / "kiln-job_x-abc").mkdir(parents=True)
    server = Server(home)
    try:
        assert not dead.parent.exists()
        assert (mine / "kiln-job_x-abc").is_dir()
        r = server.upload(b"a,b\n", "norows.csv")  # refused: its scratch copy goes too
        assert r.status_code == 422, r.text
        assert server.uploads_in_scratch() == []
    finally:
        server.stop()


@pytest.mark.slow
def test_the_largest_allowed_upload_stays_under_1_gib(default_server: Server) -> None:
    """A real 190 MB table at the default upload limit: parsed, hashed, encrypted, stored."""
    row = b"0.5,1.5,a-fairly-long-category-value\n"
    data = b"x1,x2,label\n" + row * (190_000_000 // len(row))
    r, growth = default_server.peak_growth(lambda: default_server.upload(data, "big.csv"))
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 190_000_000 // len(row)
    assert growth < GIB, f"the server grew by {growth / 2**20:.0f} MiB"
    assert default_server.uploads_in_scratch() == []


def test_a_gzip_encoded_body_is_not_inflated(default_server: Server) -> None:
    """Neither uvicorn nor starlette decode ``Content-Encoding: gzip``: the body stays bytes."""
    boundary = "kilnzip"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.csv"\r\n\r\n'
    ).encode()
    body += b"a\n" + b"1\n" * (32 << 20) + f"\r\n--{boundary}--\r\n".encode()  # 64 MB
    packed = gzip.compress(body, compresslevel=1)
    del body
    before = default_server.dataset_count()
    r, growth = default_server.peak_growth(
        lambda: default_server.client.post(
            f"{API}/datasets",
            content=packed,
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Encoding": "gzip",
            },
        )
    )
    assert r.status_code == 400, r.text
    assert default_server.dataset_count() == before
    assert growth < GIB
