#!/usr/bin/env python3
"""A plain registry for tests/process/sync.rs that has lost a manifest: it lists repository
`mirror/app` with tag `t9`, answers `HEAD` of the tag with a digest, and `GET` of any
manifest with `404 MANIFEST_UNKNOWN`.

    fake_upstream.py PORT
"""
import http.server
import json
import sys

DIGEST = "sha256:" + "ab" * 32


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        js = [("content-type", "application/json")]
        if self.path == "/v2/":
            return self.answer(200, b"{}", js)
        if self.path.startswith("/v2/mirror/app/tags/list"):
            return self.answer(200, json.dumps({"name": "mirror/app", "tags": ["t9"]}).encode(), js)
        if "/manifests/" in self.path:
            err = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            return self.answer(404, json.dumps(err).encode(), js)
        self.answer(404)

    def do_HEAD(self):
        if self.path == "/v2/mirror/app/manifests/t9":
            return self.answer(200, b"", [("docker-content-digest", DIGEST),
                                          ("content-type", "application/vnd.oci.image.manifest.v1+json")])
        self.answer(404)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
