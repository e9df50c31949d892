"""A real S3-compatible server on loopback for the store tests: moto's server app behind a checksum check.

Run as a script: `python tests/s3server.py [--port 0] [--exit-on-stdin-eof]`. It binds 127.0.0.1, prints
`PORT <n>` on stdout once it is listening, and serves until SIGTERM, or, with --exit-on-stdin-eof, until its
stdin closes (so it dies with the test process that started it, even one killed without cleanup).

Why the checksum check: AWS S3 and MinIO refuse an upload whose body does not match its Content-MD5 or
x-amz-checksum-* header (BadDigest), which is what makes a verified write verified. moto 5 stores those
headers without checking them, so this thin WSGI layer does the check that the real servers do, on the
same HTTP path, before handing the request to moto unchanged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import logging
import signal
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from typing import Any

_DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "HTTP_CONTENT_MD5": lambda body: hashlib.md5(body).digest(),
    "HTTP_X_AMZ_CHECKSUM_SHA256": lambda body: hashlib.sha256(body).digest(),
    "HTTP_X_AMZ_CHECKSUM_SHA1": lambda body: hashlib.sha1(body).digest(),
    "HTTP_X_AMZ_CHECKSUM_CRC32": lambda body: zlib.crc32(body).to_bytes(4, "big"),
}

_BAD_DIGEST = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>BadDigest</Code>'
    b"<Message>The checksum you specified did not match the calculated checksum.</Message></Error>"
)


def verify_checksums(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Wrap a WSGI app so a PUT whose body disagrees with its checksum header gets 400 BadDigest, as S3 does."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        headers = [h for h in _DIGESTS if h in environ]
        streaming = "aws-chunked" in environ.get("HTTP_CONTENT_ENCODING", "") or environ.get(
            "HTTP_X_AMZ_CONTENT_SHA256", ""
        ).startswith("STREAMING")
        if environ.get("REQUEST_METHOD") != "PUT" or not headers or streaming:
            return app(environ, start_response)  # chunked bodies carry trailers: moto parses those
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        for header in headers:
            sent = environ[header].strip()
            if sent != base64.b64encode(_DIGESTS[header](body)).decode():
                start_response("400 Bad Request", [("Content-Type", "application/xml")])
                return [_BAD_DIGEST]
        return app(environ, start_response)

    return wrapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on the test output
    app = verify_checksums(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if args.exit_on_stdin_eof:
        threading.Thread(target=lambda: (sys.stdin.read(), stop()), daemon=True).start()
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
