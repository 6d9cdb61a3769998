"""The ``unistore`` command line: ``info``, ``ls``, ``convert``, ``verify``, ``db ...``, ``experiments ...``,
``datasets ...``, ``demo``.

Storage options are passed as ``-o key=value`` (values parsed as JSON when
they can be), e.g. ``-o endpoint_url=http://127.0.0.1:9000 -o anon=true``;
credentials may also come from the usual ``AWS_*`` environment variables.
They are never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from unistore.errors import UnistoreError


def _options(pairs: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: storage option {key!r} needs the form key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unistore")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_info(args: argparse.Namespace) -> int:
    from unistore.storage.array import RaggedArray
    from unistore.storage.formats.base import dtype_name
    from unistore.storage.store import open_store

    store = open_store(args.url, format=args.format, storage_options=_options(args.option))
    print(f"store:  {store.location.url}\nformat: {store.format}\narrays: {len(store)}")
    if store.attrs:
        print(f"attrs:  {json.dumps(store.attrs, default=str)[:200]}")
    rows = [["key", "shape", "dtype", "chunks", "compression", "stored", "bytes", "format"]]
    for key in store.keys():
        a = store[key]
        shape = f"ragged[{len(a)}]" if isinstance(a, RaggedArray) else str(a.shape)
        rows.append([key, shape, dtype_name(a.dtype), str(a.chunks or "-"), a.compression or "-",
                     human_size(a.stored_nbytes), human_size(a.nbytes), a.format])
    print(_table(rows))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from unistore.storage.store import open_store

    for key in open_store(args.url, format=args.format, storage_options=_options(args.option)).keys():
        print(key)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from unistore.storage.convert import convert

    chunks = tuple(int(c) for c in args.chunks.split(",")) if args.chunks else None
    opts = _options(args.option)
    report = convert(args.src, args.dst, format=args.to, compression=args.compression, chunks=chunks,
                     src_storage_options=_options(args.src_option) or opts,
                     dst_storage_options=_options(args.dst_option) or opts,
                     overwrite=args.overwrite, progress=not args.quiet, scheduler=args.dask)
    print(f"converted {report.arrays} arrays ({human_size(report.logical_bytes)} of data): "
          f"{human_size(report.src_bytes)} -> {human_size(report.dst_bytes)} on storage "
          f"({report.ratio:.2f}x) at {args.dst}")
    if args.dask:
        print(f"on Dask: {report.blocks_copied} blocks copied, {report.blocks_skipped} already staged and verified, "
              f"{human_size(report.source_bytes_read)} read from the source")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from unistore.storage.store import open_store

    store = open_store(args.url, format=args.format, storage_options=_options(args.option))
    report = store.verify(scheduler=args.dask, progress=args.dask is not None)
    for key, status in report.items():
        print(f"{status:12s} {key}")
    checked = sum(1 for s in report.values() if s == "ok")
    print(f"{checked} of {len(report)} arrays verified")
    if checked == 0 and report:
        print("this store has no recorded checksums (it was not written by unistore)", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from unistore.demo import run_demo
    from unistore.demo_experiments import run_experiments_demo
    from unistore.demo_lora import run_lora_demo
    from unistore.demo_training import run_training_demo

    # everything the demo records goes to a catalog inside its own directory, unless one is set
    os.environ.setdefault("UNISTORE_CATALOG_URL", os.path.join(os.path.abspath(args.dir), "catalog.db"))
    os.makedirs(args.dir, exist_ok=True)
    if not args.skip_read_table:
        run_demo(rows=args.rows, dim=args.dim, workdir=args.dir, batches=args.batches)
    results = run_training_demo(args.dir, rows=args.train_rows, pairs=args.train_rows, steps=args.steps,
                                s3_endpoint=args.s3_endpoint)
    results += run_lora_demo(args.dir, s3_endpoint=args.s3_endpoint)
    run_experiments_demo(args.dir)
    from unistore.demo import closing_words

    print(closing_words(args.dir))
    return 0 if all(r["last"] < r["first"] for r in results) else 1


def cmd_cache(args: argparse.Namespace) -> int:
    from unistore.storage.cache import default_cache

    cache = default_cache(args.dir)
    if cache is None:
        print("error: no cache directory: pass --dir or set UNISTORE_CACHE_DIR", file=sys.stderr)
        return 2
    if args.cache_command == "clear":
        print(f"removed {human_size(cache.clear())} from {cache.root}")
        return 0
    info = cache.info()
    print(_table([["root", info["root"]], ["entries", f"{info['entries']} blocks of {info['objects']} objects"],
                  ["size", f"{human_size(info['bytes'])} of {human_size(info['max_bytes'])}"],
                  ["block size", human_size(info["block_bytes"])]]))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from unistore.datasets import dataset_url, get_dataset_config, import_cifar, import_mnist, list_available_datasets

    options = _options(args.storage_option)
    if args.ds_command == "list":
        rows = [["name", "input shape", "classes", "store"]]
        for name in list_available_datasets():
            config = get_dataset_config(name)
            rows.append([name, "x".join(map(str, config.input_shape)), str(config.num_classes),
                         dataset_url(name, args.data_dir, options) or "-"])
        print(_table(rows))
        return 0
    if args.kind == "mnist":
        url = import_mnist(args.source, args.data_dir, format=args.format, storage_options=options,
                           overwrite=args.overwrite)
    else:
        url = import_cifar(args.source, args.data_dir, variant=args.kind, format=args.format, storage_options=options,
                           overwrite=args.overwrite)
    print(f"imported {args.kind} from {args.source} into {url}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from unistore import migrations
    from unistore.schemas.engine import make_engine, safe_url, unavailable_as_typed

    if args.db_command == "history":
        for rev, down, doc in migrations.history():
            print(f"{down or 'base'} -> {rev}  {doc.splitlines()[0]}")
        return 0
    if args.db_command == "import-legacy":
        from unistore.migrations.legacy import import_legacy

        report = import_legacy(args.path, args.url, name=args.name, skip_bad=args.skip_bad, progress=not args.quiet)
        print(report)
        return 0
    if args.db_command in ("export-labels", "drop-dataset"):
        return _db_labels(args)
    if args.db_command == "revision":
        path = migrations.revision(args.message, args.url, autogenerate=not args.empty)
        print(f"wrote {path}; review it, then: unistore db upgrade")
        return 0
    engine = make_engine(args.url)
    shown = safe_url(engine.url)
    try:
        with unavailable_as_typed(engine):
            return _db_on_engine(args, engine, shown)
    finally:
        engine.dispose()


def _db_labels(args: argparse.Namespace) -> int:
    import json

    from unistore.catalog import connect
    from unistore.schemas.labels import drop_dataset, export_labels

    with connect(args.url) as catalog:
        if args.db_command == "drop-dataset":
            n = drop_dataset(catalog, args.name)
            print(f"dropped dataset {args.name!r} ({n} samples and their labels) from {catalog.url}; its "
                  "embedding files were not touched")
            return 0
        records = export_labels(catalog, args.name, manual_only=args.manual)
    text = json.dumps(records, indent=1) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {len(records)} labels of {args.name!r} to {args.output}", file=sys.stderr)
    return 0


def _db_on_engine(args: argparse.Namespace, engine: Any, shown: str) -> int:
    from unistore import migrations

    if args.db_command == "upgrade":
        migrations.upgrade(engine, args.revision)
        print(f"{shown} is at revision {migrations.current_revision(engine)}")
    elif args.db_command == "downgrade":
        migrations.downgrade(engine, args.revision)
        print(f"{shown} is at revision {migrations.current_revision(engine) or 'base'}")
    elif args.db_command == "current":
        current, head = migrations.current_revision(engine), migrations.head_revision()
        state = "up to date" if current == head else f"behind head {head}: run unistore db upgrade"
        print(f"{shown}: revision {current or 'none'} ({state})")
    elif args.db_command == "check":
        current, head = migrations.current_revision(engine), migrations.head_revision()
        if current != head:
            print(f"{shown} is at revision {current or 'none'}, head is {head}: run unistore db upgrade",
                  file=sys.stderr)
            return 1
        diffs = migrations.check(engine)
        if diffs:
            print("the models and the migrated schema differ (a migration is missing):", file=sys.stderr)
            for diff in diffs:
                print(f"  {diff}", file=sys.stderr)
            return 1
        print(f"{shown}: models and migrations agree at revision {head}")
    return 0


def _searcher(args: argparse.Namespace) -> Any:
    from unistore.experiments import ChromaConfig, ExperimentSearcher

    config = ChromaConfig(persist_directory=args.chroma_dir, collection_name=args.collection, host=args.host,
                          port=args.port)
    return ExperimentSearcher(config, catalog_url=args.url)


def cmd_experiments(args: argparse.Namespace) -> int:
    searcher = _searcher(args)
    try:
        if args.exp_command == "reindex":
            count = searcher.reindex(progress=not args.quiet)
            print(f"reindexed {count} experiments from {searcher.catalog.url} into {searcher.config.where}")
        elif args.exp_command == "show":
            record = {"experiment_id": args.experiment_id,
                      "experiment_data": searcher.get_experiment(args.experiment_id)}
            print(json.dumps(record, indent=2, sort_keys=True))
        elif args.exp_command == "export":
            out = open(args.output, "w") if args.output else sys.stdout
            try:
                count = 0
                for eid, data in searcher.iter_experiments():
                    out.write(json.dumps({"experiment_id": eid, "experiment_data": data}, sort_keys=True) + "\n")
                    count += 1
            finally:
                if args.output:
                    out.close()
            print(f"exported {count} experiments", file=sys.stderr)
        else:
            _print_results(_search(searcher, args))
    finally:
        searcher.close()
    return 0


def _json_arg(text: str | None, option: str) -> Any:
    from unistore.experiments import InvalidFilterError

    try:
        return json.loads(text) if text else {}
    except ValueError as e:
        raise InvalidFilterError(f"{option} is not valid JSON ({e})") from e


def _search(searcher: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    filters = _json_arg(args.filter, "--filter")
    if args.similar or args.architecture:
        query = _json_arg(args.similar, "--similar")
        if args.architecture:
            try:
                query["architecture"] = [int(w) for w in args.architecture.split(",")]
            except ValueError as e:
                raise SystemExit(f"error: --architecture needs comma-separated integers ({e})") from e
        if args.dataset:
            filters["dataset"] = args.dataset
        if args.min_accuracy is not None:
            filters["accuracy"] = {"$gte": args.min_accuracy}
        if args.max_parameters is not None:
            filters["parameters"] = {"$lte": args.max_parameters}
        return list(searcher.search_similar_experiments(query, n_results=args.n, filters=filters or None))
    if args.hypothesis:
        return list(searcher.search_by_hypothesis(args.hypothesis, n_results=args.n))
    return list(searcher.search_by_performance(min_accuracy=args.min_accuracy, max_parameters=args.max_parameters,
                                               dataset=args.dataset, n_results=args.n, filters=filters or None))


def _print_results(results: list[dict[str, Any]]) -> None:
    rows = [["experiment", "distance", "accuracy", "parameters", "depth", "dataset"]]
    for r in results:
        m = r["metadata"]
        rows.append([r["experiment_id"], "-" if r["distance"] is None else f"{r['distance']:.3f}",
                     f"{m['accuracy']:.4f}" if "accuracy" in m else "-", f"{m.get('parameters', 0):,}",
                     str(m.get("depth", "-")), str(m.get("dataset", "-"))])
    print(_table(rows))
    print(f"{len(results)} experiments")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unistore", description="One storage layer for ML training data.",
        epilog="Storage options: -o key=value (repeatable; values parsed as JSON when they can be), e.g. "
               "-o endpoint_url=http://127.0.0.1:9000 -o anon=true. Exit status: 0 ok, 1 a check failed, 2 error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def store_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("url", help="store path or URL (s3://..., memory://...)")
        p.add_argument("--format", default="auto", help="format (default: detect)")
        p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="fsspec storage option")
        return p

    store_cmd("info", "arrays, shapes, dtypes, chunks, compression and sizes").set_defaults(func=cmd_info)
    store_cmd("ls", "list array keys").set_defaults(func=cmd_ls)
    p = store_cmd("verify", "recompute and compare stored checksums")
    p.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                   help="one task per array on Dask: a local cluster, or the scheduler at ADDRESS (tcp://host:port)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("convert", help="copy a store into another format or filesystem",
                       description="Copy every array, its attributes and checksums into a new store, published "
                                   "atomically when it is complete.")
    p.add_argument("src", help="the store to read (path or URL; its format is detected)")
    p.add_argument("dst", help="the store to write (path or URL); must not exist unless --overwrite")
    p.add_argument("--to", required=True, help="destination format: npy, pt, safetensors, hdf5, zarr")
    p.add_argument("--compression", help="zarr: zstd, gzip, blosc, lz4 (e.g. zstd:5); hdf5: gzip, lzf")
    p.add_argument("--chunks", help="chunk shape for every array, e.g. 1024,384")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                   help="copy row blocks in parallel on Dask: a local cluster, or the scheduler at ADDRESS")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="storage option for both ends")
    p.add_argument("--src-option", action="append", metavar="KEY=VALUE", help="storage option for the source only")
    p.add_argument("--dst-option", action="append", metavar="KEY=VALUE",
                   help="storage option for the destination only")
    p.set_defaults(func=cmd_convert)

    db = sub.add_parser("db", help="catalog migrations and the legacy importer")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    url_help = ("catalog URL or SQLite path (default: $UNISTORE_CATALOG_URL, else "
                "~/.local/share/unistore/catalog.db)")

    def db_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = dbsub.add_parser(name, help=help)
        p.add_argument("--url", default=None, help=url_help)
        p.set_defaults(func=cmd_db)
        return p

    db_cmd("upgrade", "migrate the catalog up (default: to head)").add_argument("revision", nargs="?", default="head")
    db_cmd("downgrade", "migrate the catalog down to REVISION ('base' drops everything)").add_argument("revision")
    db_cmd("current", "show the catalog's revision")
    db_cmd("history", "list the migrations")
    db_cmd("check", "exit non-zero when the models and the migrations differ")
    p = db_cmd("revision", "write a new migration into the package (autogenerated from the models' differences)")
    p.add_argument("-m", "--message", required=True, help="what the migration does (also its file name)")
    p.add_argument("--empty", action="store_true", help="empty upgrade/downgrade functions, nothing compared")
    p = db_cmd("import-legacy", "import a legacy dataset.db (pickled labels) into the catalog")
    p.add_argument("path", help="the legacy dataset.db")
    p.add_argument("--name", help="dataset name (default: the directory holding dataset.db)")
    p.add_argument("--skip-bad", action="store_true", help="import good rows and report bad ones")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = db_cmd("export-labels", "write a dataset's labels (with --manual: only hand corrections) as JSON")
    p.add_argument("name", help="the dataset's name in the catalog")
    p.add_argument("--manual", action="store_true", help="only labels corrected through unistore")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    db_cmd("drop-dataset", "delete a dataset's samples and labels from the catalog (files are kept)").add_argument(
        "name", help="the dataset's name in the catalog")

    exp = sub.add_parser("experiments", help="search, show, export and reindex experiments")
    expsub = exp.add_subparsers(dest="exp_command", required=True)

    def exp_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = expsub.add_parser(name, help=help)
        p.add_argument("--url", default=None, help="catalog URL (default: $UNISTORE_CATALOG_URL, else "
                                                   "~/.local/share/unistore/catalog.db)")
        p.add_argument("--chroma-dir", default="chroma", help="embedded index directory (default: ./chroma)")
        p.add_argument("--host", help="a Chroma server instead of the embedded index")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--collection", default="experiments")
        p.set_defaults(func=cmd_experiments)
        return p

    p = exp_cmd("search", "similar experiments (--similar/--architecture), by hypothesis, or by performance")
    p.add_argument("--similar", metavar="JSON",
                   help='an experiment to compare with, e.g. \'{"architecture": [784, 10]}\'')
    p.add_argument("--architecture", metavar="W1,W2,...", help="layer widths to compare with")
    p.add_argument("--hypothesis")
    p.add_argument("--min-accuracy", type=float)
    p.add_argument("--max-parameters", type=int)
    p.add_argument("--dataset")
    p.add_argument("--filter", metavar="JSON", help='more filters, e.g. \'{"depth": {"$lte": 4}}\'')
    p.add_argument("-n", type=int, default=10, help="at most this many results")
    exp_cmd("show", "one experiment's record as JSON").add_argument("experiment_id")
    exp_cmd("export", "every experiment as JSON lines").add_argument("--output", "-O", help="file (default: stdout)")
    exp_cmd("reindex", "rebuild the search index from the catalog").add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar")

    cache = sub.add_parser("cache", help="the persistent local cache of remote reads ($UNISTORE_CACHE_DIR)")
    cachesub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("info", "where the cache is, its entries and size"), ("clear", "delete every entry")):
        p = cachesub.add_parser(name, help=text)
        p.add_argument("--dir", help="cache directory (default: $UNISTORE_CACHE_DIR)")
        p.set_defaults(func=cmd_cache)

    ds = sub.add_parser("datasets", help="list the dataset factory's datasets, import MNIST / CIFAR files")
    dssub = ds.add_subparsers(dest="ds_command", required=True)
    for name, text in (("list", "registered datasets and where their stores are"),
                       ("import", "turn MNIST IDX files or CIFAR python batches into a factory store")):
        p = dssub.add_parser(name, help=text)
        p.add_argument("--data-dir", help="data root (default: $UNISTORE_DATA_DIR, $DATA_DIR or ./data)")
        p.add_argument("--storage-option", "-o", action="append", metavar="KEY=VALUE")
        p.set_defaults(func=cmd_datasets)
        if name == "import":
            p.add_argument("kind", choices=["mnist", "cifar10", "cifar100"])
            p.add_argument("source", help="directory holding the downloaded files (any URL)")
            p.add_argument("--format", default="npy", help="format of the store (default npy)")
            p.add_argument("--overwrite", action="store_true", help="replace an existing store once the new one is "
                                                                    "complete")

    p = sub.add_parser("demo", help="write an embedding dataset in every format, compare read speed, and train "
                                    "the same models from every backend")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the embedding dataset (default 200000)")
    p.add_argument("--dim", type=int, default=384, help="embedding width (default 384)")
    p.add_argument("--batches", type=int, default=200, help="random batches of 256 rows per read-speed round "
                                                             "(default 200)")
    p.add_argument("--dir", default="demo-data", help="working directory (default: ./demo-data)")
    p.add_argument("--train-rows", type=int, default=20_000, help="samples/pairs of the training datasets")
    p.add_argument("--steps", type=int, default=300, help="training steps per backend")
    p.add_argument("--s3-endpoint", help="also train from a bucket on this S3 server (default: "
                                         "$UNISTORE_DEMO_S3_ENDPOINT or $AWS_ENDPOINT_URL; skipped when unset)")
    p.add_argument("--skip-read-table", action="store_true", help="only the training part")
    p.set_defaults(func=cmd_demo)
    return parser


#: how the library's messages spell a fix, and how this command spells it
_CLI_SPELLING = (
    (re.compile(r"pass overwrite=True"), "pass --overwrite"),
    (re.compile(r"storage_options=\{'key': \.\.\., 'secret': \.\.\.\}"), "-o key=... -o secret=..."),
    (re.compile(r"storage_options=\{'anon': True\}"), "-o anon=true"),
    (re.compile(r"storage_options=\{'token': ([^}]+)\}"), r"-o token=\1"),
    (re.compile(r"storage_options=\{'account_name': \.\.\., 'account_key': \.\.\.\}"),
     "-o account_name=... -o account_key=..."),
    (re.compile(r"storage_options endpoint_url"), "-o endpoint_url=..."),
)


def for_the_command_line(message: str) -> str:
    """A library message with its fixes spelled as this command's flags (``--overwrite``, ``-o key=...``)."""
    for pattern, flag in _CLI_SPELLING:
        message = pattern.sub(flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unistore`` command.

    Exit status: 0 on success, 1 when a check fails (``db check``, a demo whose loss did not fall), 2 on an
    error (printed as one line naming the fix), 130 on Ctrl-C.  Output cut short by a closed pipe
    (``unistore info ... | head``) ends quietly.
    """
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except UnistoreError as e:
        print(f"error: {for_the_command_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our output went away (head, less): nothing to report; stdout is pointed at /dev/null so
        # the interpreter's own flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:  # an optional library missing where no MissingDependencyError was raised
        print(f"error: {e}; install what this command needs: pip install 'unistore[all]'", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        if os.environ.get("UNISTORE_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set UNISTORE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
