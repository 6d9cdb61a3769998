"""Experiment search: ChromaDB is the search index, the catalog is the record.

Every indexed experiment is first written to the catalog (``experiments`` +
``experiment_metrics``), then upserted into a Chroma collection with a vector
from :class:`ExperimentFeaturizer` (or an embedding function of your own) and
flat metadata for filtering.  The collection can always be rebuilt from the
catalog (:meth:`ExperimentSearcher.reindex`, ``unistore experiments reindex``),
after the index is lost or when the embedding changes.

Chroma runs embedded (``chromadb.PersistentClient`` in ``persist_directory``)
by default, or as a server when :class:`ChromaConfig` names a ``host``
(``chromadb.HttpClient``; start one with ``chroma run --path DIR``).  Nothing
is downloaded: Chroma's default embedding function is never used.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unistore.errors import ArrayNotFoundError, NonFiniteMetricError, UnistoreError

__all__ = ["ChromaConfig", "ExperimentSearcher", "ExperimentFeaturizer", "ExperimentNotFoundError",
           "InvalidFilterError", "SearchIndexUnavailableError", "NonFiniteMetricError", "get_chroma_client",
           "ChromaClient", "reset_chroma_client", "parameter_count", "flat_metadata", "finite_json"]

#: Widths of at most this many layers enter the vector; deeper nets keep their depth and parameter count.
MAX_LAYERS = 16
_DATASET_BUCKETS = 8
FEATURE_DIM = 1 + MAX_LAYERS + 1 + _DATASET_BUCKETS + 2
_OPERATORS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"}


class ExperimentNotFoundError(ArrayNotFoundError):
    """No experiment with that id in the catalog."""


class InvalidFilterError(UnistoreError, ValueError):
    """A search filter uses an unknown operator or a value Chroma cannot compare."""


class SearchIndexUnavailableError(UnistoreError, ConnectionError):
    """The Chroma server cannot be reached (the catalog write, if any, was committed)."""


@dataclass
class ChromaConfig:
    """Where the search index lives.

    Args:
        persist_directory: directory of the embedded index (``PersistentClient``).
        collection_name: the Chroma collection.
        host: a Chroma server (``HttpClient``) instead of the embedded index.
        port: the server's port.
        ssl: whether the server speaks HTTPS.
        headers: HTTP headers sent to the server (authentication).
        catalog_url: the catalog holding the experiments (default:
            :func:`unistore.schemas.engine.default_catalog_url`).
        embedding_function: a Chroma embedding function over the experiments' JSON documents
            (default: :class:`ExperimentFeaturizer`).
    """

    persist_directory: str = "chroma"
    collection_name: str = "experiments"
    host: str | None = None
    port: int = 8000
    ssl: bool = False
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    catalog_url: str | None = None
    embedding_function: Any = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The index's address, for messages."""
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}" if self.host else self.persist_directory


def parameter_count(architecture: Sequence[int]) -> int:
    """Weights and biases of a dense network with these layer widths (``[784, 512, 10]`` -> 407,050)."""
    widths = [int(w) for w in architecture]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def finite_json(value: Any, path: str) -> Any:
    """``value`` as plain JSON data, refusing NaN/inf anywhere (PostgreSQL's JSON has no such numbers)."""
    if isinstance(value, Mapping):
        return {str(k): finite_json(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [finite_json(v, f"{path}[{i}]") for i, v in enumerate(list(value))]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise NonFiniteMetricError(f"{path} is {float(value)}; experiments need finite numbers")
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise InvalidFilterError(f"{path} holds a {type(value).__name__}; experiment data must be JSON-like")


def _metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics: ``final_performance`` entries, plus a top-level ``accuracy`` / ``loss``."""
    out = {k: float(v) for k, v in (data.get("final_performance") or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("accuracy", "loss"):
        if key in data and isinstance(data[key], (int, float)) and not isinstance(data[key], bool):
            out.setdefault(key, float(data[key]))
    return out


def flat_metadata(data: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar fields Chroma filters on: dataset, depth, parameters, hypothesis_id, every metric."""
    config = data.get("config") or {}
    arch = data.get("architecture") or []
    meta: dict[str, Any] = {"depth": len(arch)}
    params = data.get("parameters")
    meta["parameters"] = int(params) if params is not None else parameter_count(arch) if arch else 0
    dataset = data.get("dataset") or config.get("dataset")
    if dataset:
        meta["dataset"] = str(dataset)
    for key in ("hypothesis_id", "status"):
        value = data.get(key) or config.get(key)
        if value is not None:
            meta[key] = str(value)
    for key in ("epochs", "batch_size", "learning_rate", "lr"):
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            meta[key] = config[key]
    meta.update(_metrics(data))
    return meta


class ExperimentFeaturizer:
    """A deterministic experiment vector: nothing to download, nearest neighbours that make sense.

    ``[2 x depth, log2(width + 1) per layer (16 slots, 0 past the last layer),
    log10(parameters + 1), dataset one-hot (8 hashed buckets), accuracy, log(1 + loss)]``.
    Depth and widths dominate, so an architecture a few units away ranks above
    one of another depth; the dataset and metrics separate otherwise equal nets.
    Called like an embedding function, on the experiments' JSON documents.
    """

    def __call__(self, input: Sequence[str]) -> list[np.ndarray]:
        return [self.featurize(json.loads(doc)) for doc in input]

    @staticmethod
    def featurize(data: Mapping[str, Any]) -> np.ndarray:
        v = np.zeros(FEATURE_DIM, dtype=np.float32)
        arch = [float(w) for w in (data.get("architecture") or [])]
        v[0] = 2.0 * len(arch)
        for i, w in enumerate(arch[:MAX_LAYERS]):
            v[1 + i] = math.log2(w + 1)
        meta = flat_metadata(data)
        v[1 + MAX_LAYERS] = math.log10(meta["parameters"] + 1)
        if "dataset" in meta:
            v[2 + MAX_LAYERS + zlib.crc32(meta["dataset"].encode()) % _DATASET_BUCKETS] = 1.0
        v[-2] = meta.get("accuracy", 0.0)
        v[-1] = math.log1p(max(meta.get("loss", 0.0), 0.0))
        return v


# ----------------------------------------------------------------- clients
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


class ChromaClient:
    """This process's Chroma client (every Chroma client method), plus :meth:`count`: how many experiments
    the configured collection holds, the number the seed documents print to verify an installation."""

    def __init__(self, client: Any, config: ChromaConfig):
        self._client = client
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def count(self) -> int:
        """Experiments indexed in ``config.collection_name`` (0 before the first is indexed)."""
        names = [getattr(c, "name", c) for c in self._client.list_collections()]
        if self._config.collection_name not in names:
            return 0
        return int(self._client.get_collection(self._config.collection_name, embedding_function=None).count())

    def __repr__(self) -> str:
        return f"<unistore ChromaClient {self._config.where} collection={self._config.collection_name!r}>"


def get_chroma_client(config: ChromaConfig | None = None) -> Any:
    """This process's Chroma client for ``config`` (embedded or server), created once (a :class:`ChromaClient`:
    Chroma's client with ``count()``).

    Raises:
        SearchIndexUnavailableError: the server cannot be reached.
    """
    config = config or ChromaConfig()
    key = (os.getpid(), config.host, config.port, config.ssl, None if config.host else
           os.path.abspath(config.persist_directory))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            from unistore._optional import require

            chromadb = require("chromadb")
            from chromadb.config import Settings

            settings = Settings(anonymized_telemetry=False, allow_reset=True)
            try:
                if config.host:
                    client = chromadb.HttpClient(host=config.host, port=config.port, ssl=config.ssl,
                                                 headers=config.headers or None, settings=settings)
                    client.heartbeat()
                else:
                    client = chromadb.PersistentClient(path=config.persist_directory, settings=settings)
            except Exception as e:  # noqa: BLE001 - chromadb raises ValueError, ConnectionError, httpx errors...
                if not config.host:
                    raise
                raise SearchIndexUnavailableError(
                    f"cannot reach the Chroma server at {config.where} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); start it with `chroma run --path DIR --host {config.host} "
                    f"--port {config.port}`, then run `unistore experiments reindex` to catch it up") from e
            _CLIENTS[key] = client
    return ChromaClient(client, config)


def reset_chroma_client() -> None:
    """Forget the cached clients (the next call connects again, and reopens an embedded index from disk)."""
    import sys

    with _CLIENTS_LOCK:
        _CLIENTS.clear()
        if "chromadb" in sys.modules:  # chromadb keeps one system per path; drop them too
            from chromadb.api.client import SharedSystemClient

            SharedSystemClient.clear_system_cache()


def _where(filters: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Chroma's ``where`` from ``{'dataset': 'cifar10', 'accuracy': {'$gte': 0.85}}`` (several keys -> ``$and``)."""
    if not filters:
        return None
    if not isinstance(filters, Mapping):
        raise InvalidFilterError(f"filters must be a dict of field -> value or {{operator: value}}, got {filters!r}")
    clauses = []
    for key, cond in filters.items():
        if key.startswith("$"):
            raise InvalidFilterError(f"filter field {key!r}: write {{field: {{'$gte': value}}}}; top-level operators "
                                     "are not supported")
        if isinstance(cond, Mapping):
            for op, value in cond.items():
                if op not in _OPERATORS:
                    raise InvalidFilterError(f"filter on {key!r} uses {op!r}; operators: {sorted(_OPERATORS)}")
                if op in ("$in", "$nin"):
                    if not isinstance(value, (list, tuple)) or not value:
                        raise InvalidFilterError(f"{op} on {key!r} needs a non-empty list, got {value!r}")
                    value = [_filter_scalar(key, v) for v in value]
                else:
                    value = _filter_scalar(key, value)
                    if op in ("$gt", "$gte", "$lt", "$lte") and (isinstance(value, (str, bool))):
                        raise InvalidFilterError(f"filter on {key!r}: {op} compares numbers, got {value!r}; "
                                                 f"write e.g. {{{key!r}: {{{op!r}: 0.85}}}}")
                clauses.append({key: {op: value}})
        else:
            clauses.append({key: {"$eq": _filter_scalar(key, cond)}})
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _filter_scalar(key: str, value: Any) -> Any:
    if isinstance(value, (bool, str)) or value is None:
        if value is None:
            raise InvalidFilterError(f"filter on {key!r} compares with None; Chroma stores no nulls")
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not math.isfinite(float(value)):
            raise InvalidFilterError(f"filter on {key!r} compares with {value}")
        return value.item() if isinstance(value, np.generic) else value
    raise InvalidFilterError(f"filter on {key!r} compares with a {type(value).__name__}; use a number or a string")


class ExperimentSearcher:
    """Index experiments and search them by similarity, performance, architecture or hypothesis.

    >>> searcher = ExperimentSearcher(ChromaConfig(persist_directory="runs/chroma"))
    >>> searcher.index_experiment("exp_001", {"architecture": [784, 512, 256, 10],
    ...                                       "final_performance": {"accuracy": 0.95},
    ...                                       "config": {"dataset": "mnist", "epochs": 20}})
    >>> searcher.search_similar_experiments({"architecture": [784, 500, 250, 10]}, n_results=5)
    >>> searcher.search_by_performance(min_accuracy=0.9, max_parameters=1_000_000, dataset="mnist")

    Each result is ``{"experiment_id", "distance", "metadata", "experiment_data"}``
    (``distance`` is ``None`` for pure filter searches).
    """

    def __init__(self, config: ChromaConfig | None = None, catalog_url: str | None = None):
        self.config = config or ChromaConfig()
        from unistore.schemas.engine import default_catalog_url

        self.catalog_url = catalog_url or self.config.catalog_url or default_catalog_url()
        self.embedding_function = self.config.embedding_function or ExperimentFeaturizer()
        self._catalog: Any = None
        self._collection: Any = None

    # ------------------------------------------------------------- plumbing
    @property
    def catalog(self) -> Any:
        if self._catalog is None:
            from unistore.catalog import connect

            self._catalog = connect(self.catalog_url)
        return self._catalog

    @property
    def collection(self) -> Any:
        """The Chroma collection (created on first use, with this searcher's embedding function)."""
        if self._collection is None:
            client = get_chroma_client(self.config)
            # vectors are always computed here and passed explicitly, so Chroma needs no embedding
            # function of its own (and never reaches for its default, which downloads a model)
            self._collection = self._guard(lambda: client.get_or_create_collection(
                self.config.collection_name, embedding_function=None, metadata={"hnsw:space": "l2"}))
        return self._collection

    def _guard(self, fn: Any) -> Any:
        """Run a Chroma call; a server that went away is a :class:`SearchIndexUnavailableError`."""
        try:
            return fn()
        except UnistoreError:
            raise
        except ValueError as e:  # Chroma's verdict on a where clause or a value it cannot store
            raise InvalidFilterError(f"the search index refused the request: {str(e).splitlines()[0][:300]}") \
                from e
        except (TypeError, KeyError):
            raise
        except Exception as e:  # noqa: BLE001 - transport errors of chromadb's HTTP client
            if not self.config.host:
                raise
            reset_chroma_client()
            self._collection = None
            raise SearchIndexUnavailableError(
                f"the Chroma server at {self.config.where} failed ({type(e).__name__}); the catalog at "
                f"{self.catalog.url} has the experiments: run `unistore experiments reindex` once it is back") from e

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        self._collection = None

    def _embed(self, documents: list[str]) -> list[Any]:
        return [np.asarray(v, dtype=np.float32) for v in self.embedding_function(documents)]

    def count(self) -> int:
        """Experiments in the search index."""
        return int(self._guard(lambda: self.collection.count()))

    # ------------------------------------------------------------- indexing
    def index_experiment(self, experiment_id: str, experiment_data: Mapping[str, Any]) -> None:
        """Record ``experiment_data`` in the catalog, then index it (replacing an earlier version).

        Raises:
            NonFiniteMetricError: a NaN or infinite number in the data.
            SearchIndexUnavailableError: the Chroma server is down (the catalog row is committed).
        """
        self.index_experiments({experiment_id: experiment_data})

    def index_experiments(self, experiments: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
                          batch_size: int = 2000) -> int:
        """Batch form of :meth:`index_experiment`: one catalog transaction and one upsert per batch.

        Returns how many experiments were indexed.
        """
        items = list(experiments.items() if isinstance(experiments, Mapping) else experiments)
        clean = [(str(eid), finite_json(data, f"experiment {eid!r}")) for eid, data in items]
        for start in range(0, len(clean), batch_size):
            batch = clean[start:start + batch_size]
            self._record(batch)
            self._upsert(batch)
        return len(clean)

    def index_experiments_batch(self, experiments: Iterable[tuple[str, Mapping[str, Any]]],
                                batch_size: int = 2000) -> int:
        """``index_experiments`` under the name the seed documents use: ``[(experiment_id, data), ...]``."""
        return self.index_experiments(experiments, batch_size=batch_size)

    def _record(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Write the experiments and their metrics to the catalog (the record), in one transaction."""
        from sqlalchemy import delete, insert, select

        from unistore.schemas import Experiment, ExperimentMetric

        names = [eid for eid, _ in batch]
        with self.catalog.session() as session:
            existing = {name: pk for name, pk in session.execute(
                select(Experiment.name, Experiment.id).where(Experiment.name.in_(names)))}
            for eid, data in batch:
                if eid in existing:
                    row = session.get(Experiment, existing[eid])
                    assert row is not None
                    row.config = data
                    row.status = "indexed"
                else:
                    session.add(Experiment(name=eid, config=data, status="indexed"))
            session.flush()
            ids = {name: pk for name, pk in session.execute(
                select(Experiment.name, Experiment.id).where(Experiment.name.in_(names)))}
            session.execute(delete(ExperimentMetric).where(ExperimentMetric.experiment_id.in_(ids.values()),
                                                           ExperimentMetric.step.is_(None)))
            rows = [{"experiment_id": ids[eid], "name": name, "step": None, "value": value}
                    for eid, data in batch for name, value in _metrics(data).items()]
            if rows:
                session.execute(insert(ExperimentMetric), rows)

    def _upsert(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        documents = [json.dumps(data, sort_keys=True) for _, data in batch]
        embeddings = self._embed(documents)
        self._guard(lambda: self.collection.upsert(ids=[eid for eid, _ in batch], embeddings=embeddings,
                                                   metadatas=[flat_metadata(data) for _, data in batch],
                                                   documents=documents))

    def delete_experiment(self, experiment_id: str) -> None:
        """Remove an experiment from the catalog and the index.

        Raises:
            ExperimentNotFoundError: no such experiment.
        """
        from sqlalchemy import select

        from unistore.schemas import Experiment

        with self.catalog.session() as session:
            row = session.scalar(select(Experiment).where(Experiment.name == str(experiment_id)))
            if row is None:
                raise ExperimentNotFoundError(f"no experiment {experiment_id!r} in the catalog at {self.catalog.url}")
            session.delete(row)
        self._guard(lambda: self.collection.delete(ids=[str(experiment_id)]))

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        """The recorded data of ``experiment_id`` (from the catalog).

        Raises:
            ExperimentNotFoundError: no such experiment.
        """
        from sqlalchemy import select

        from unistore.schemas import Experiment

        with self.catalog.session() as session:
            data = session.scalar(select(Experiment.config).where(Experiment.name == str(experiment_id)))
        if data is None:
            raise ExperimentNotFoundError(f"no experiment {experiment_id!r} in the catalog at {self.catalog.url}")
        return dict(data)

    def reindex(self, batch_size: int = 2000, progress: bool = False) -> int:
        """Rebuild the Chroma collection from the catalog; returns the number of experiments indexed."""
        from sqlalchemy import func, select
        from tqdm.auto import tqdm

        from unistore.schemas import Experiment

        client = get_chroma_client(self.config)
        name = self.config.collection_name

        def drop() -> None:
            if name in [getattr(c, "name", c) for c in client.list_collections()]:
                client.delete_collection(name)

        self._guard(drop)
        self._collection = None
        with self.catalog.session() as session:
            total = session.scalar(select(func.count()).select_from(Experiment)) or 0
        bar = tqdm(total=total, desc="reindex", unit="exp", disable=not progress)
        batch: list[tuple[str, dict[str, Any]]] = []
        done = 0
        for item in self.iter_experiments():
            batch.append(item)
            if len(batch) == batch_size:
                self._upsert(batch)
                done += len(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            self._upsert(batch)
            done += len(batch)
            bar.update(len(batch))
        bar.close()
        return done

    def iter_experiments(self, page: int = 5000) -> Iterable[tuple[str, dict[str, Any]]]:
        """Every ``(experiment_id, experiment_data)`` recorded in the catalog, in insertion order, a page at a time."""
        from sqlalchemy import select

        from unistore.schemas import Experiment

        last = 0
        while True:
            with self.catalog.session() as session:
                rows = session.execute(select(Experiment.id, Experiment.name, Experiment.config)
                                       .where(Experiment.id > last).order_by(Experiment.id).limit(page)).all()
            if not rows:
                return
            for _, name, data in rows:
                yield name, dict(data or {})
            last = rows[-1][0]

    # ------------------------------------------------------------- searching
    def _results(self, ids: list[str], metadatas: list[Any], documents: list[Any],
                 distances: list[Any] | None) -> list[dict[str, Any]]:
        return [{"experiment_id": eid, "distance": None if distances is None else float(distances[i]),
                 "metadata": dict(metadatas[i] or {}), "experiment_data": json.loads(documents[i])}
                for i, eid in enumerate(ids)]

    def search_similar_experiments(self, query_experiment: Mapping[str, Any], n_results: int = 5,
                                   filters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``n_results`` experiments nearest to ``query_experiment``, optionally filtered.

        ``filters`` maps fields to values or ``{'$gte'|'$lte'|'$gt'|'$lt'|'$ne'|'$eq': v}``
        or ``{'$in'|'$nin': [...]}``; several fields must all hold.

        Raises:
            InvalidFilterError: an unknown operator or a value that cannot be compared.
        """
        where = _where(filters)
        query = self._embed([json.dumps(finite_json(query_experiment, "query"), sort_keys=True)])
        n = max(0, min(int(n_results), self.count()))
        if n == 0:
            return []
        got = self._guard(lambda: self.collection.query(query_embeddings=query, n_results=n, where=where,
                                                        include=["metadatas", "documents", "distances"]))
        return self._results(got["ids"][0], got["metadatas"][0], got["documents"][0], got["distances"][0])

    def search_by_architecture(self, architecture: Sequence[int], n_results: int = 10,
                               filters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Experiments whose architecture is nearest to ``architecture`` (depth first, then widths)."""
        return self.search_similar_experiments({"architecture": list(architecture)}, n_results, filters)

    def _filtered(self, where: dict[str, Any] | None) -> list[dict[str, Any]]:
        got = self._guard(lambda: self.collection.get(where=where, include=["metadatas", "documents"]))
        return self._results(got["ids"], got["metadatas"], got["documents"], None)

    def search_by_performance(self, min_accuracy: float | None = None, max_parameters: int | None = None,
                              dataset: str | None = None, n_results: int | None = None,
                              filters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Experiments with ``accuracy >= min_accuracy``, ``parameters <= max_parameters`` and on ``dataset``,
        best accuracy first."""
        conditions: dict[str, Any] = dict(filters or {})
        if min_accuracy is not None:
            conditions["accuracy"] = {"$gte": float(min_accuracy)}
        if max_parameters is not None:
            conditions["parameters"] = {"$lte": int(max_parameters)}
        if dataset is not None:
            conditions["dataset"] = str(dataset)
        results = self._filtered(_where(conditions))
        results.sort(key=lambda r: (-r["metadata"].get("accuracy", -math.inf), r["experiment_id"]))
        return results[:n_results] if n_results is not None else results

    def search_by_hypothesis(self, hypothesis_id: str, n_results: int = 20) -> list[dict[str, Any]]:
        """Experiments run for ``hypothesis_id``, best accuracy first."""
        return self.search_by_performance(filters={"hypothesis_id": str(hypothesis_id)}, n_results=n_results)
