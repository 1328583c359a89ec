#!/usr/bin/env python3
"""Talks to azurite (the Azure Blob Storage emulator) for tests/process/blobstore.rs, with the
emulator's well-known development account and SharedKey signing: object_store cannot create a
container, and azurite refuses unsigned requests.

    azurite.py create PORT CONTAINER          create the container, unless it exists
    azurite.py list PORT CONTAINER PREFIX     print the name of every blob under PREFIX
    azurite.py put PORT CONTAINER NAME TEXT   write blob NAME holding TEXT
"""
import base64
import hashlib
import hmac
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (the same for every installation).
KEY = base64.b64decode(
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
VERSION = "2021-08-06"


def request(method, port, container, query, ok=(), name="", body=b""):
    date = formatdate(usegmt=True)
    path = f"{container}/{name}" if name else container
    canonical_query = "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    length = str(len(body)) if body else ""
    blob_type = ["x-ms-blob-type:BlockBlob"] if body else []
    to_sign = "\n".join(
        [method, "", "", length, "", "application/octet-stream" if body else ""] + [""] * 6
        + blob_type
        + [f"x-ms-date:{date}", f"x-ms-version:{VERSION}",
           f"/{ACCOUNT}/{ACCOUNT}/{path}{canonical_query}"]
    )
    sig = base64.b64encode(hmac.new(KEY, to_sign.encode(), hashlib.sha256).digest()).decode()
    url = f"http://127.0.0.1:{port}/{ACCOUNT}/{path}?{urllib.parse.urlencode(query)}"
    headers = {
        "x-ms-date": date, "x-ms-version": VERSION, "Content-Length": str(len(body)),
        "Authorization": f"SharedKey {ACCOUNT}:{sig}",
    }
    if body:
        headers["x-ms-blob-type"] = "BlockBlob"
        headers["Content-Type"] = "application/octet-stream"
    req = urllib.request.Request(url, method=method, headers=headers, data=body or None)
    try:
        with urllib.request.urlopen(req) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code in ok:
            return ""
        sys.exit(f"azurite.py: {method} {url}: {e.code} {e.read()[:300]!r}")


def main():
    cmd, port, container = sys.argv[1:4]
    if cmd == "create":
        request("PUT", port, container, {"restype": "container"}, ok=(409,))  # 409: it exists
    elif cmd == "list":
        body = request("GET", port, container,
                       {"restype": "container", "comp": "list", "prefix": sys.argv[4]})
        for name in re.findall(r"<Name>([^<]*)</Name>", body):
            print(name)
    elif cmd == "put":
        request("PUT", port, container, {}, name=sys.argv[4], body=sys.argv[5].encode())
    else:
        sys.exit(f"azurite.py: unknown command {cmd}")


main()
