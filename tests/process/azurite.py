#!/usr/bin/env python3
"""Talks to azurite (the Azure Blob Storage emulator) for tests/process/blobstore.rs, with the
emulator's well-known development account and SharedKey signing: object_store cannot create a
container, and azurite refuses unsigned requests.

    azurite.py create PORT CONTAINER          create the container, unless it exists
    azurite.py list PORT CONTAINER PREFIX     print the name of every blob under PREFIX
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


def request(method, port, container, query, ok=()):
    date = formatdate(usegmt=True)
    canonical_query = "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    to_sign = "\n".join(
        [method] + [""] * 11 + [f"x-ms-date:{date}", f"x-ms-version:{VERSION}",
                                f"/{ACCOUNT}/{ACCOUNT}/{container}{canonical_query}"]
    )
    sig = base64.b64encode(hmac.new(KEY, to_sign.encode(), hashlib.sha256).digest()).decode()
    url = f"http://127.0.0.1:{port}/{ACCOUNT}/{container}?{urllib.parse.urlencode(query)}"
    req = urllib.request.Request(url, method=method, headers={
        "x-ms-date": date, "x-ms-version": VERSION, "Content-Length": "0",
        "Authorization": f"SharedKey {ACCOUNT}:{sig}",
    })
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
    else:
        sys.exit(f"azurite.py: unknown command {cmd}")


main()
