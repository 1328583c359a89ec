#!/usr/bin/env python3
"""Print `sha256sum`-style lines for the regular files an image's layers produce.

usage: layerfiles.py LAYOUT_DIR REF [--platform os/arch]

REF is a tag (org.opencontainers.image.ref.name in index.json) or a digest of a manifest or
index in the OCI layout. Layers are applied in order (later files win; whiteouts are honoured),
and one line "<sha256 hex>  ./<path>" per regular file is printed, sorted by path, which is
what `cd ROOTFS && find . -type f | sort | xargs sha256sum` prints for the unpacked image.
The interop tests compare this with what a real client unpacked.
"""
import argparse, gzip, hashlib, io, json, os, posixpath, sys, tarfile


def blob(layout, digest):
    alg, hexd = digest.split(":", 1)
    with open(os.path.join(layout, "blobs", alg, hexd), "rb") as f:
        return f.read()


def resolve(layout, ref, platform):
    index = json.load(open(os.path.join(layout, "index.json")))
    desc = None
    for m in index["manifests"]:
        if m["digest"] == ref or (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref:
            desc = m
    if desc is None:
        sys.exit(f"layerfiles.py: {ref} not found in {layout}/index.json")
    doc = json.loads(blob(layout, desc["digest"]))
    if "manifests" in doc:  # an index: pick the platform
        want_os, want_arch = platform.split("/")
        for m in doc["manifests"]:
            p = m.get("platform") or {}
            if p.get("os") == want_os and p.get("architecture") == want_arch:
                return json.loads(blob(layout, m["digest"]))
        sys.exit(f"layerfiles.py: no {platform} manifest in {ref}")
    return doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("layout")
    ap.add_argument("ref")
    ap.add_argument("--platform", default="linux/amd64")
    a = ap.parse_args()
    manifest = resolve(a.layout, a.ref, a.platform)
    files = {}
    for layer in manifest["layers"]:
        data = blob(a.layout, layer["digest"])
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
            for info in t:
                name = posixpath.normpath(info.name.lstrip("/"))
                if name in (".", ""):
                    continue
                base = posixpath.basename(name)
                parent = posixpath.dirname(name)
                if base == ".wh..wh..opq":
                    prefix = parent + "/" if parent else ""
                    for k in [k for k in files if k.startswith(prefix)]:
                        del files[k]
                    continue
                if base.startswith(".wh."):
                    gone = posixpath.join(parent, base[4:])
                    for k in [k for k in files if k == gone or k.startswith(gone + "/")]:
                        del files[k]
                    continue
                if info.isfile():
                    files[name] = hashlib.sha256(t.extractfile(info).read()).hexdigest()
    for name in sorted(files):
        print(f"{files[name]}  ./{name}")


if __name__ == "__main__":
    main()
