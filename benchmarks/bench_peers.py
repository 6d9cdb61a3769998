"""unistore beside MosaicML streaming, litdata and Hugging Face datasets on one training read workload.

The same arrays (``rows x dim`` float32 embeddings and an int64 label) are
written by each library in its own format; each is then read for two shuffled
epochs, batches of 256, through a DataLoader with 2 worker processes, from
local disk and from the S3 server (moto, its own process) behind the counting
proxy with ``--latency-ms`` added to every request.  Samples/s are divided by
those of a raw numpy memmap read the same way in the same run; requests and
bytes are counted at the proxy, per epoch.

Each reading runs in a process of its own under ``--timeout`` seconds: a peer
that fails or hangs gets its condition in the table instead of a figure.

    python benchmarks/bench_peers.py                      # 200k x 384, 30 ms
    python benchmarks/bench_peers.py --rows 50000 --peers unistore,streaming

The peers are not unistore's dependencies: ``pip install mosaicml-streaming
litdata datasets`` in the environment that runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

BATCH = 256
PEERS = ["raw memmap", "unistore", "streaming", "litdata", "hf datasets"]


# ----------------------------------------------------------------------------- writing, each in its own format
def write_all(work: str, emb: np.ndarray, labels: np.ndarray, peers: list[str]) -> dict[str, str]:
    """Each peer's copy of the arrays under ``work``; returns peer -> directory."""
    out = {}
    raw = os.path.join(work, "raw")
    os.makedirs(raw, exist_ok=True)
    emb.tofile(os.path.join(raw, "x.bin"))
    labels.tofile(os.path.join(raw, "y.bin"))
    out["raw memmap"] = raw
    for peer in peers:
        path = os.path.join(work, peer.replace(" ", "-"))
        try:
            WRITERS[peer](path, emb, labels)
            out[peer] = path
        except Exception as e:  # noqa: BLE001 - recorded in the table
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [""]
            out[peer] = f"ERROR writing: {type(e).__name__}: {last[0].strip()[:160]}"
    return out


def _write_unistore(path: str, emb: np.ndarray, labels: np.ndarray) -> None:
    import unistore as us

    with us.create_store(path, format="npy", overwrite=True) as store:
        store.write_array("x", emb)
        store.write_array("y", labels)


def _write_streaming(path: str, emb: np.ndarray, labels: np.ndarray) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=path, columns={"x": f"ndarray:float32:{emb.shape[1]}", "y": "int64"},
                   size_limit="64mb") as writer:
        for i in range(len(emb)):
            writer.write({"x": emb[i], "y": np.int64(labels[i])})


class _LitItem:
    """litdata's item function: row ``i`` of the raw copy (picklable, for litdata's worker processes)."""

    def __init__(self, raw: str, n: int, dim: int):
        self.raw, self.n, self.dim = raw, n, dim

    def __call__(self, i: int) -> dict[str, Any]:
        x, y = _Raw(self.raw, self.n, self.dim)[[i]]
        return {"x": np.ascontiguousarray(x[0]), "y": int(y[0])}


def _write_litdata(path: str, emb: np.ndarray, labels: np.ndarray) -> None:
    import litdata

    raw = os.path.join(os.path.dirname(path), "raw")
    litdata.optimize(fn=_LitItem(raw, len(emb), emb.shape[1]), inputs=list(range(len(emb))), output_dir=path,
                     chunk_bytes="64MB", num_workers=1, mode="overwrite")


def _write_hf(path: str, emb: np.ndarray, labels: np.ndarray) -> None:
    import datasets

    datasets.Dataset.from_dict({"x": emb, "y": labels}).save_to_disk(path)


WRITERS = {"unistore": _write_unistore, "streaming": _write_streaming, "litdata": _write_litdata,
           "hf datasets": _write_hf}


# ----------------------------------------------------------------------------- reading (in a child process)
def _batches_loader(dataset: Any, n: int, epoch: int) -> Any:
    """A DataLoader handing whole index batches to ``dataset.__getitem__`` (one gather per batch)."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    g = torch.Generator().manual_seed(epoch)
    sampler = BatchSampler(RandomSampler(range(n), generator=g), BATCH, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2)


class _Raw:
    """The baseline: one fancy index per batch into memmaps opened once per process."""

    def __init__(self, path: str, n: int, dim: int):
        self.path, self.n, self.dim = path, n, dim
        self._maps: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> tuple[str, int, int]:
        return (self.path, self.n, self.dim)

    def __setstate__(self, state: tuple[str, int, int]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def __getitem__(self, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None or self._maps[0] != os.getpid():
            self._maps = (os.getpid(),
                          np.memmap(os.path.join(self.path, "x.bin"), np.float32, "r", shape=(self.n, self.dim)),
                          np.memmap(os.path.join(self.path, "y.bin"), np.int64, "r", shape=(self.n,)))
        return self._maps[1][idx], self._maps[2][idx]


def _hf_rows(dataset: Any) -> Any:
    class Rows:
        def __getitem__(self, idx: list[int]) -> Any:
            b = dataset[idx]
            return b["x"], b["y"]

    return Rows()


def epochs(peer: str, path: str, n: int, dim: int, remote: str | None, options: dict[str, Any], cache: str) -> Any:
    """Yields (samples, seconds) for epoch 1, then for epoch 2."""
    if peer == "raw memmap":
        for epoch in range(2):
            yield _timed(_batches_loader(_Raw(path, n, dim), n, epoch))
    elif peer == "unistore":
        import unistore as us
        from unistore.datasets import StoreDataset, make_loader

        store = us.open_store(remote or path, storage_options=options if remote else None, cache=cache)
        loader = make_loader(StoreDataset(store, keys=["x", "y"]), BATCH, num_workers=2, seed=0)
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            yield _timed(loader)
    elif peer == "streaming":
        from streaming import StreamingDataset
        from torch.utils.data import DataLoader

        ds = StreamingDataset(local=cache if remote else path, remote=remote, shuffle=True, batch_size=BATCH,
                              shuffle_seed=0)
        loader = DataLoader(ds, batch_size=BATCH, num_workers=2)
        for _ in range(2):
            yield _timed(loader)
    elif peer == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset

        where = remote or path
        kwargs: dict[str, Any] = {"storage_options": {"endpoint_url": options["client_kwargs"]["endpoint_url"],
                                                      "aws_access_key_id": options["key"],
                                                      "aws_secret_access_key": options["secret"]}} if remote else {}
        if remote:
            from litdata.streaming.resolver import Dir

            where = Dir(path=cache, url=remote)
        ds = StreamingDataset(where, shuffle=True, seed=0, **kwargs)
        loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=2)
        for _ in range(2):
            yield _timed(loader)
    elif peer == "hf datasets":
        import datasets

        download = 0.0
        if remote:  # datasets reads Arrow files from local disk: the copy is part of the first epoch
            local = os.path.join(cache, "hf")
            import s3fs

            start = time.perf_counter()
            s3fs.S3FileSystem(**options).get(remote.removeprefix("s3://") + "/", local + "/", recursive=True)
            download = time.perf_counter() - start
            ds = datasets.load_from_disk(local)
        else:
            ds = datasets.load_from_disk(path)
        ds = ds.with_format("numpy")
        for epoch in range(2):
            samples, seconds = _timed(_batches_loader(_hf_rows(ds), n, epoch))
            yield samples, seconds + (download if epoch == 0 else 0.0)
    else:
        raise ValueError(peer)


def _timed(loader: Any) -> tuple[int, float]:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        seen += len(x)
    return seen, time.perf_counter() - start


def child(args: argparse.Namespace) -> None:
    """One peer, one place: prints one JSON line per epoch, waiting for a line on stdin between them (the parent
    reads the proxy's counts there)."""
    options = json.loads(os.environ.get("BENCH_S3_OPTIONS", "{}"))
    if args.remote:
        os.environ.update({"S3_ENDPOINT_URL": options["client_kwargs"]["endpoint_url"],
                           "AWS_ACCESS_KEY_ID": options["key"], "AWS_SECRET_ACCESS_KEY": options["secret"],
                           "AWS_ENDPOINT_URL": options["client_kwargs"]["endpoint_url"],
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})  # obstore (litdata)
    cache = tempfile.mkdtemp(prefix="peer-cache-", dir=args.work)
    for samples, seconds in epochs(args.one, args.path, args.rows, args.dim, args.remote, options, cache):
        print(json.dumps({"samples": samples, "seconds": seconds}), flush=True)
        sys.stdin.readline()


# ----------------------------------------------------------------------------- the parent
def _line(proc: subprocess.Popen[str], deadline: float) -> str | None:
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            return proc.stdout.readline()


def measure(peer: str, path: str, args: argparse.Namespace, remote: str | None, wire: Any) -> dict[str, Any]:
    """Epoch 1 and 2 figures of one peer in a child process, or the condition it ended in."""
    env = {**os.environ, "BENCH_S3_OPTIONS": json.dumps(wire.options if wire else {})}
    cmd = [sys.executable, __file__, "--one", peer, "--path", path, "--rows", str(args.rows), "--dim", str(args.dim),
           "--work", args.work] + (["--remote", remote] if remote else [])
    if wire:
        wire.proxy.reset_counts()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + args.timeout
    out: dict[str, Any] = {"epochs": [], "wire": []}
    try:
        for _ in range(2):
            line = _line(proc, deadline)
            if line is None:
                out["condition"] = f"hung: no epoch within {args.timeout:.0f} s"
                break
            if not line:
                err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                errors = [e.strip() for e in err if re.match(r"^\s*[\w.]*(Error|Exception)\b", e)]
                last = (errors or err or ["exited"])[-1]
                inner = [m for e in err for m in re.findall(r"source: (\w+),?$", e.strip())]
                if last.endswith("{") and inner:  # a Rust error's debug dump: name its innermost cause
                    last = f"{last.rstrip(' {')} ({inner[-1]})"
                out["condition"] = f"failed: {last[:160]}"
                break
            out["epochs"].append(json.loads(line))
            if wire:
                out["wire"].append((wire.proxy.requests.get("GET", 0), wire.proxy.bytes_out))
                wire.proxy.reset_counts()
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
    finally:
        proc.kill()
        proc.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per peer and place")
    parser.add_argument("--peers", default="unistore,streaming,litdata,hf datasets")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--remote", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return
    args.work = args.work or tempfile.mkdtemp(prefix="bench-peers-")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    labels = rng.integers(0, 100, args.rows, dtype=np.int64)
    paths = write_all(args.work, emb, labels, peers)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for peer in ["raw memmap", *peers]:
        path = paths[peer]
        results[(peer, "local")] = (measure(peer, path, args, None, None) if not path.startswith("ERROR")
                                    else {"condition": path, "epochs": []})
        print(f"local {peer}: {results[(peer, 'local')]}", file=sys.stderr, flush=True)
    if not args.skip_s3:
        from wire import s3_behind_proxy

        with s3_behind_proxy("peers") as wire:
            for peer in peers:
                path = paths[peer]
                if path.startswith("ERROR"):
                    results[(peer, "s3")] = {"condition": path, "epochs": []}
                    continue
                url = wire.upload(path, peer.replace(" ", "-"))
                stored = wire.stored(url)
                wire.proxy.latency = args.latency_ms / 1000
                results[(peer, "s3")] = {**measure(peer, path, args, url, wire), "stored": stored}
                wire.proxy.latency = 0.0
                print(f"s3 {peer}: {results[(peer, 's3')]}", file=sys.stderr, flush=True)
    print(report(results, args))


def report(results: dict[tuple[str, str], dict[str, Any]], args: argparse.Namespace) -> str:
    def rate(r: dict[str, Any], i: int) -> float | None:
        e = r.get("epochs", [])
        return e[i]["samples"] / e[i]["seconds"] if len(e) > i else None

    base = [rate(results[("raw memmap", "local")], i) for i in range(2)]
    rows = [["library", "where", "epoch 1 samples/s", "epoch 2 samples/s", "epoch 1 / raw memmap",
             "epoch 2 / raw memmap", "epoch 1 GETs (bytes / stored)", "epoch 2 GETs", "condition"]]
    for (peer, where), r in results.items():
        rates = [rate(r, i) for i in range(2)]
        wire = r.get("wire", [])
        stored = r.get("stored")
        rows.append([peer, where if where == "local" else f"S3 +{args.latency_ms:g} ms",
                     *[f"{v:,.0f}" if v else "-" for v in rates],
                     *[f"{v / b:.2f}x" if v and b else "-" for v, b in zip(rates, base)],
                     f"{wire[0][0]} ({wire[0][1] / stored:.2f}x)" if wire and stored else "-",
                     str(wire[1][0]) if len(wire) > 1 else "-", r.get("condition", "ok")])
    head = (f"{args.rows} x {args.dim} float32 + int64 label, shuffled, batches of {BATCH}, DataLoader with 2 "
            "workers; ratios to a raw numpy memmap read locally the same way in this run; GETs and bytes at the "
            "proxy\n\n")
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return head + "\n".join(lines)


if __name__ == "__main__":
    main()
