"""Verified downloads (kdpipe.data.fetch): one sentence naming the setting to fix when the
server is unreachable, the file is missing or the connection drops, and no partial file left."""

from __future__ import annotations

import http.server
import threading

import pytest

from kdpipe.data.fetch import download_file
from kdpipe.errors import KdpipeError
from tests.data_fixtures import http_server

SETTINGS = "data.cifar10"  # the params section named in the messages (the CIFAR-10 source's)


def test_unreachable_server_and_missing_file(tmp_path):
    with http_server(tmp_path) as base:
        pass  # the server is gone: its port now refuses connections
    with pytest.raises(KdpipeError, match="could not download .*set data.cifar10.url to its local path"):
        download_file(f"{base}/cifar-10-python.tar.gz", tmp_path / "raw/c.tar.gz", "0" * 32, SETTINGS)
    with pytest.raises(KdpipeError, match="does not exist; set data.cifar10.url"):
        download_file(str(tmp_path / "nope.tar.gz"), tmp_path / "raw2/c.tar.gz", "0" * 32, SETTINGS)
    with http_server(tmp_path) as base:
        with pytest.raises(KdpipeError, match="answered 404"):
            download_file(f"{base}/missing.tar.gz", tmp_path / "raw3/c.tar.gz", "0" * 32, SETTINGS)
    assert not list(tmp_path.rglob("*.part"))


def test_connection_dropped_mid_download(tmp_path):
    class Dropping(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promises 100,000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dropping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.tar.gz"
        with pytest.raises(KdpipeError, match=r"incomplete \(10 of 100,000 bytes\)|broke off after 10 bytes"):
            download_file(url, tmp_path / "raw/cifar-10-python.tar.gz", "0" * 32, SETTINGS)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not list((tmp_path / "raw").iterdir())
