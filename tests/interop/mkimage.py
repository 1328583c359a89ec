#!/usr/bin/env python3
"""Build an OCI image layout on disk without any registry or daemon.

usage: mkimage.py DIR [--layers N] [--layer-size BYTES] [--platforms linux/amd64,linux/arm64] [--tag TAG]

With one platform it writes an image manifest; with several, an index of per-platform
manifests. Layer contents are random (seeded by the tag), gzip-compressed tarballs.
"""
import argparse, gzip, hashlib, io, json, os, random, tarfile

def put(blobs, data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + d, "size": len(data)}

def layer(rng, size, name):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        payload = rng.randbytes(size)
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0
        t.addfile(info, io.BytesIO(payload))
    tar = raw.getvalue()
    gz = gzip.compress(tar, compresslevel=1, mtime=0)
    return tar, gz

def image(blobs, rng, layers, size, os_, arch):
    descs, diff_ids = [], []
    for i in range(layers):
        tar, gz = layer(rng, size, f"file-{arch}-{i}")
        d = put(blobs, gz)
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        descs.append(d)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    config = json.dumps({"architecture": arch, "os": os_, "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "config": {"Cmd": ["/file-0"]}}, separators=(",", ":")).encode()
    c = put(blobs, config)
    c["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": c, "layers": descs}, separators=(",", ":")).encode()
    m = put(blobs, manifest)
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    m["platform"] = {"architecture": arch, "os": os_}
    return m

def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--layer-size", type=int, default=4096)
    p.add_argument("--platforms", default="linux/amd64")
    p.add_argument("--tag", default="latest")
    a = p.parse_args()
    blobs = os.path.join(a.dir, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    rng = random.Random(a.tag + a.platforms)
    plats = [x.split("/") for x in a.platforms.split(",")]
    mans = [image(blobs, rng, a.layers, a.layer_size, o, ar) for o, ar in plats]
    if len(mans) == 1:
        top = dict(mans[0]); top.pop("platform")
    else:
        idx = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                          "manifests": mans}, separators=(",", ":")).encode()
        top = put(blobs, idx)
        top["mediaType"] = "application/vnd.oci.image.index.v1+json"
    top["annotations"] = {"org.opencontainers.image.ref.name": a.tag}
    index_path = os.path.join(a.dir, "index.json")
    existing = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(index_path):
        existing = json.load(open(index_path))
    existing["manifests"].append(top)
    json.dump(existing, open(index_path, "w"))
    json.dump({"imageLayoutVersion": "1.0.0"}, open(os.path.join(a.dir, "oci-layout"), "w"))
    print(top["digest"])

if __name__ == "__main__":
    main()
