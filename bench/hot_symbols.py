#!/usr/bin/env python3
"""Keeps `link/hot-symbols.txt`: the functions that run while Outpost starts and idles.

`build.rs` places these functions together at the front of the release binary's code, so an
idle server keeps ~2.5 MiB of its code resident instead of ~9 MiB (docs/benchmarks.md, run 7).
Symbol names carry hashes that change with the compiler version, the dependency versions in
Cargo.lock and their features, so the list must be regenerated when those change; `--check`,
run by test.sh on the release build, says when. LLVM's `.llvm.<hash>` suffix of internal
functions also changes with the checkout's path and any edit in the same code unit, so the
list keeps such names as `NAME.llvm.` and build.rs matches any suffix. A Rust function whose
name is unique in the binary once the hash is cut off is kept as `NAME17h` and matches any
hash; instances of generic functions (one name, many hashes) are kept exactly, and are most
of the list, so a new compiler or a dependency's feature change needs a new list (`--check`
says so; with another compiler than the list's it only reports it).

    bench/hot_symbols.py              regenerate the list from a release build
                                      (needs valgrind and perf)
    bench/hot_symbols.py --check BIN  exit 1 if fewer than 90% of the listed names are in BIN

How the list is made: the release binary runs under callgrind, once with the embedded
defaults and once as bench/run.sh starts it (admin password, anonymous pull, log level warn);
each run starts, answers `GET /v2/`, idles IDLE_SECS (65 s: past the first run of every
periodic task, the last of which start a minute in) and is dumped. Callgrind runs code on a
simulated CPU without SHA or AVX-512, and thread timing differs, so the list is then
refined: the relinked binary starts under `perf record -e page-faults`, and any function
whose code faulted outside `.text.hot` is added, until no new one appears.
"""

import bisect
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "link" / "hot-symbols.txt"
PLAIN = re.compile(r"^[A-Za-z0-9_.$]+$")
LLVM_SUFFIX = re.compile(r"\.llvm\.\d+$")
LEGACY_HASH = re.compile(r"^(.*17h)[0-9a-f]{16}E(\.llvm\.\d+)?$")
REGENERATE = ("run bench/hot_symbols.py to regenerate link/hot-symbols.txt "
              "(it needs valgrind and perf: apt-get install valgrind linux-perf)")
CONFIGS = [
    ("defaults", {}, []),
    (
        "bench",
        {"OUTPOST_ADMIN_PASSWORD": "hot-symbols", "OUTPOST_ANONYMOUS_PULL": "true"},
        ["--log-level", "warn"],
    ),
]


def listed(name):
    """A symbol name without the digits of an `.llvm.` suffix."""
    return LLVM_SUFFIX.sub(".llvm.", name)


def path_free(name):
    """A v0-mangled name (`_R…`) without its crate disambiguators (`Cs<hash>_`) and back
    references (`B<offset>_`): a workspace crate's disambiguator comes from its path, so a
    checkout elsewhere (a CI clone) names every generic instance of our crates differently.
    build.rs matches these parts with `*` in the same way."""
    if not name.startswith("_R"):
        return name
    return re.sub(r"B[0-9A-Za-z]*_", "B_", re.sub(r"Cs[0-9A-Za-z]+_", "Cs_", name))


def hash_free(name):
    """A Rust symbol's name up to its hash (`…17h`), or None for other names."""
    m = LEGACY_HASH.match(name)
    return m.group(1) if m else None


def entries(names, binary_names):
    """The list's entries for the functions `names`. A Rust function whose name up to the
    hash no other function of the binary shares is kept as that prefix (ending in `17h`):
    it still matches when a new compiler or dependency changes every hash. The others
    (instances of generic functions, whose names differ only in the hash) are kept exactly,
    without the digits of an `.llvm.` suffix."""
    counts = collections.Counter(p for p in map(hash_free, binary_names) if p)
    out = set()
    for n in names:
        p = hash_free(n)
        out.add(p if p and counts[p] == 1 else listed(n))
    return out


def matches(entry, exact, prefixes):
    """Whether a list entry names a function of a binary (`exact`: its names as `listed`
    keeps them; `prefixes`: its Rust names up to the hash)."""
    return entry in prefixes if entry.endswith("17h") else path_free(entry) in exact


def rustc_version(binary):
    """`rustc X.Y.Z (hash date)` of the compiler that built `binary` (its `.comment`)."""
    out = subprocess.run(["readelf", "-p", ".comment", str(binary)], capture_output=True, text=True).stdout
    m = re.search(r"rustc version (\S+ \([^)]*\))", out)
    return f"rustc {m.group(1)}" if m else None


def read_list():
    """The header's rustc line and the names."""
    header_rustc, names = None, []
    for line in LIST.read_text().splitlines():
        if line.startswith("# rustc "):
            header_rustc = line[2:].strip()
        elif line and not line.startswith("#"):
            names.append(line.strip())
    return header_rustc, names


def text_symbols(binary):
    """(address, size, name) of every function symbol, sorted by address."""
    out = subprocess.run(["nm", "-n", "-S", "--defined-only", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        p = line.split()
        if len(p) == 4 and p[2] in "tTwW":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    return syms


def section(binary, name):
    """(address, size) of a section, or None."""
    out = subprocess.run(["readelf", "-SW", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.search(r"\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m and m.group(1) == name:
            return int(m.group(2), 16), int(m.group(3), 16)
    return None


def check(binary):
    """0 when the list still matches `binary`; 1 (with what to do) when it does not."""
    header_rustc, names = read_list()
    built_by = rustc_version(binary)
    hot = section(binary, ".text.hot")
    if not hot:
        print(f"hot-symbols: {binary} has no .text.hot section: it was linked without the hot "
              "layout (NO_HOT_LAYOUT set, a debug build, gold or mold in RUSTFLAGS, or a "
              "stripped binary); check a release build of `cargo build --release`", file=sys.stderr)
        return 1
    symbols = [s[2] for s in text_symbols(binary)]
    exact = {path_free(listed(n)) for n in symbols}
    prefixes = {p for p in map(hash_free, symbols) if p}
    found = sum(1 for n in names if matches(n, exact, prefixes))
    share = found / max(len(names), 1)
    print(f"hot-symbols: {found} of {len(names)} listed functions are in {binary} ({share:.0%}); "
          f".text.hot is {hot[1]} bytes")
    if share >= 0.9:
        return 0
    if header_rustc != built_by:
        # Another compiler renames every generic instance; that is the builder's choice, not
        # a fault of the code, so it is reported without failing the tests.
        print(f"hot-symbols: the list was made with {header_rustc} and {binary} with {built_by}, "
              "so most names cannot match and the server idles at ~11 MiB instead of ~7; "
              f"for the layout with this compiler, {REGENERATE}", file=sys.stderr)
        return 0
    print("hot-symbols: the list no longer matches the code (a dependency, a feature or a "
          f"start-up function changed), and the server idles with more memory; {REGENERATE}",
          file=sys.stderr)
    return 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early with status {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # 401 is an answer
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on port {port} did not answer within {timeout} s")


RUNNING = []  # process groups to kill if the script stops early

# How long each profiled server idles. The periodic tasks of `outpost serve` first run within
# a minute (upload reaping at once, the disk check every 10 s, the fleet watch at 20 s, the
# clock watch and the event-log pruning at 60 s); code they run that is not in `.text.hot`
# stays resident from then on (~3 MiB more when only the first 2 s were profiled).
IDLE_SECS = 65


def start(prefix, binary, work, config):
    """Starts the server under `prefix` (valgrind, perf), waits for `GET /v2/`, idles."""
    _, env_extra, args = config
    port = free_port()
    data = tempfile.mkdtemp(dir=work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_", "ACR_"))}
    env.update(env_extra)
    cmd = prefix + [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data] + args
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    RUNNING.append(proc)
    wait_up(port, proc)
    time.sleep(IDLE_SECS)
    return proc


def stop(proc):
    """Kills the whole process group (the tool and the server under it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    RUNNING.remove(proc)


def callgrind_names(binary, work):
    names = set()
    for config in CONFIGS:
        out = Path(tempfile.mkdtemp(dir=work))
        prefix = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={out}/cg.%p"]
        proc = start(prefix, binary, work, config)
        # Dump what ran so far (start-up and idle), then kill: shutdown code stays out.
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, stdout=subprocess.DEVNULL)
        stop(proc)
        for f in out.iterdir():
            for line in f.read_text(errors="replace").splitlines():
                m = re.match(r"^c?fn=\(\d+\) (\S+)$", line)
                if m and PLAIN.match(m.group(1)) and not m.group(1).startswith("0x"):
                    names.add(m.group(1))
        print(f"callgrind ({config[0]}): {len(names)} functions so far", file=sys.stderr)
    return names


def faulted_outside_hot(binary, work):
    """Functions in `.text` (not `.text.hot`) whose pages were faulted in at start."""
    hot, text = section(binary, ".text.hot"), section(binary, ".text")
    if not hot or not text:
        raise RuntimeError(f"{binary} has no .text.hot section to refine")
    syms = text_symbols(binary)
    starts = [s[0] for s in syms]
    found = set()
    for config in CONFIGS:
        data = Path(tempfile.mkdtemp(dir=work)) / "perf.data"
        prefix = ["perf", "record", "-q", "-e", "page-faults", "-c", "1", "-d", "-o", str(data), "--"]
        proc = start(prefix, binary, work, config)
        # Kill the server, not perf, so perf writes its data and shutdown code is not recorded.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGKILL)
        proc.wait(timeout=60)
        RUNNING.remove(proc)
        out = subprocess.run(["perf", "script", "-i", str(data), "--show-mmap-events", "-F", "ip,addr"],
                             capture_output=True, text=True, check=True).stdout
        base = None
        for line in out.splitlines():
            if "PERF_RECORD_MMAP2" in line:
                m = re.search(r"\[(0x[0-9a-f]+)\(0x[0-9a-f]+\) @ 0 .*" + re.escape(str(binary)), line)
                if m and base is None:
                    base = int(m.group(1), 16)
                continue
            if base is None:
                continue
            for word in line.split()[:2]:
                va = int(word, 16) - base
                if not (text[0] <= va < text[0] + text[1]) or hot[0] <= va < hot[0] + hot[1]:
                    continue
                i = bisect.bisect_right(starts, va) - 1
                if i >= 0 and syms[i][0] <= va < syms[i][0] + max(syms[i][1], 1) and PLAIN.match(syms[i][2]):
                    found.add(syms[i][2])
        if base is None:
            raise RuntimeError(f"perf recorded no mapping of {binary}")
    return found


def write_list(names, binary):
    LIST.parent.mkdir(exist_ok=True)
    body = "\n".join(sorted(entries(names, [s[2] for s in text_symbols(binary)])))
    LIST.write_text(
        "# Functions that run while Outpost starts and idles, placed together by build.rs.\n"
        "# Generated by bench/hot_symbols.py; do not edit by hand.\n"
        f"# {rustc_version(binary)}\n{body}\n")


def build():
    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return (ROOT / target).resolve() / "release" / "outpost"


def generate():
    for tool in ["valgrind", "callgrind_control", "perf", "nm", "readelf"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian: apt-get install valgrind linux-perf binutils)")
    with tempfile.TemporaryDirectory() as work:
        try:
            binary = build()
            # Callgrind also names functions of libc and the loader: keep only the binary's own.
            names = callgrind_names(binary, work) & {s[2] for s in text_symbols(binary)}
            write_list(names, binary)
            for round_ in range(6):
                binary = build()
                extra = {n for n in faulted_outside_hot(binary, work) if listed(n) not in
                         {listed(m) for m in names}}
                print(f"perf round {round_ + 1}: {len(extra)} more functions", file=sys.stderr)
                if not extra:
                    break
                names |= extra
                write_list(names, binary)
            build()
        finally:
            for proc in list(RUNNING):
                stop(proc)
    print(f"wrote {LIST.relative_to(ROOT)}: {len(read_list()[1])} entries for {len(names)} functions",
          file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(check(Path(sys.argv[2])))
    elif len(sys.argv) == 1:
        generate()
    else:
        sys.exit(__doc__)
