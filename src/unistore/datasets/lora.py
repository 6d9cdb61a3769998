"""LoRA delta datasets: tokenized LoRA checkpoints, text conditions and delta labels.

A checkpoint is a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, optionally ``prompts.json``), on local disk or
any fsspec URL.  Each folder is opened as one :class:`~unistore.TensorStore`
(keys are the checkpoint's tensor names, ``adapter_config.json`` is the attr
``adapter_config``): opening reads the safetensors header only, and a sample
reads its LoRA tensors with :meth:`~unistore.TensorStore.read_arrays`, which
fetches neighbouring tensors of one file as one request.  Delta labels come
from a :class:`~unistore.datasets.DeltaCache`.

The LoRA tokenizer is any object with ``tokenize(weights) -> (tokens,
scales)``; :class:`ReferenceLoRATokenizer` is a small invertible one.  The
text tokenizer is any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from unistore.datasets.base import _TorchDataset
from unistore.datasets.deltas import DEFAULT_HIDDEN_SIZE, DeltaCache
from unistore.errors import CorruptDataError, DatasetNotFoundError, ShapeMismatchError, UnistoreError
from unistore.storage.location import Location, retry_remote
from unistore.storage.store import TensorStore, open_store

__all__ = [
    "LoRACheckpoint",
    "ReferenceLoRATokenizer",
    "Text2Qwen25LoRA_DeltaDataset",
    "DeltaAugmentedDataset",
    "DnDDatasetWithDelta",
    "wrap_dnd_dataset",
    "create_dataloader",
    "find_checkpoints",
    "open_checkpoints",
    "fallback_delta",
    "LORA_MARKERS",
]

log = logging.getLogger("unistore")

#: substrings that mark a tensor name as a LoRA factor (PEFT naming)
LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
#: concurrent checkpoint opens / reads against a remote filesystem
REMOTE_THREADS = 16


def fallback_delta(hidden_size: int, norm: float = 0.0) -> Any:
    """The delta used for a checkpoint without one: zeros, or a constant vector of L2 norm ``norm``."""
    import torch

    if norm == 0.0:
        return torch.zeros(hidden_size, dtype=torch.float32)
    return torch.full((hidden_size,), float(norm) / math.sqrt(hidden_size), dtype=torch.float32)


# ------------------------------------------------------------------ checkpoints
class LoRACheckpoint:
    """One adapter folder opened through the storage layer (headers read, tensors not).

    ``path`` is the folder as found (a local path, or a URL); ``store`` its
    TensorStore; ``lora_keys`` its LoRA tensors in sorted order; ``shapes``
    their shapes; ``adapter_config`` the parsed ``adapter_config.json``.
    """

    __slots__ = ("path", "store", "lora_keys", "shapes", "adapter_config")

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None):
        self.path = path
        try:
            self.store: TensorStore = open_store(path, format="safetensors", storage_options=storage_options)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"checkpoint folder {path} cannot be read: {e}") from e
        config = self.store.attrs.get("adapter_config")
        if not isinstance(config, dict):
            raise CorruptDataError(f"{path}/adapter_config.json is missing or not a JSON object; "
                                   "re-save the adapter (save_pretrained) or remove the folder")
        self.adapter_config: dict[str, Any] = config
        self.lora_keys = sorted(k for k in self.store.keys() if any(m in k for m in LORA_MARKERS))
        if not self.lora_keys:
            raise CorruptDataError(f"{path} holds no LoRA tensors (names with lora_A / lora_B) in "
                                   "adapter_model.safetensors; is it a PEFT LoRA adapter?")
        names = set(self.lora_keys)
        for key in self.lora_keys:
            for a, b in _PAIRS:
                if f".{a}." in key and key.replace(f".{a}.", f".{b}.") not in names:
                    raise CorruptDataError(f"{path}/adapter_model.safetensors has {key!r} but not its "
                                           f"{b} partner; the checkpoint is incomplete - re-save it")
        self.shapes = {k: tuple(self.store[k].shape) for k in self.lora_keys}

    def check_like(self, reference: LoRACheckpoint) -> None:
        """Fail unless this checkpoint has the reference's LoRA tensors with the same shapes.

        Raises:
            ShapeMismatchError: naming the tensor, both shapes and both folders.
        """
        if self.shapes == reference.shapes:
            return
        missing = sorted(set(reference.shapes) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(reference.shapes))
        if missing or extra:
            which = f"lacks {missing[0]!r}" if missing else f"has an extra {extra[0]!r}"
            raise ShapeMismatchError(f"checkpoint {self.path} {which} compared with {reference.path} "
                                     f"({len(missing)} missing, {len(extra)} extra LoRA tensors); all checkpoints "
                                     "of a dataset must share one adapter layout")
        key = next(k for k in self.lora_keys if self.shapes[k] != reference.shapes[k])
        raise ShapeMismatchError(f"LoRA tensor {key!r} has shape {self.shapes[key]} in {self.path} but "
                                 f"{reference.shapes[key]} in {reference.path}; all checkpoints of a dataset "
                                 "must share one rank and target modules")

    def read_weights(self) -> dict[str, Any]:
        """``{tensor name: torch.Tensor}`` of the LoRA tensors, sorted by name (one merged read remotely)."""
        return self.store.read_arrays(self.lora_keys, as_tensor=True)

    def __repr__(self) -> str:
        return f"<LoRACheckpoint {self.path} tensors={len(self.lora_keys)}>"


def as_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint path as the seed documents use it (``.name``, ``.parent``, ``/``, ``.rglob``): a
    ``pathlib.Path`` locally, a ``upath.UPath`` for a URL (``s3://...``; from universal_pathlib).

    Remote paths are addresses only: they carry no credentials (the dataset's ``storage_options`` do), so
    listing through one uses the filesystem's default credentials.
    """
    text = str(path)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    try:
        from upath import UPath
    except ImportError as e:
        from unistore.errors import MissingDependencyError

        raise MissingDependencyError(f"remote checkpoint paths ({text}) need universal_pathlib: pip install "
                                     "'unistore[lora]'") from e
    return UPath(text)  # type: ignore[return-value]  # a Path to its users: the same methods


def _join(folder: Location, found_dir: str, given: str) -> str:
    """The checkpoint's path spelled like the folder the user gave (as ``str(Path)`` does locally)."""
    if folder.is_local:
        rel = os.path.relpath(found_dir, folder.path)
        return str(Path(given) / rel) if rel != "." else str(Path(given))
    return f"{folder.protocol}://{found_dir}"


def find_checkpoints(checkpoint_folder: str | os.PathLike[str],
                     storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Every folder below ``checkpoint_folder`` holding an ``adapter_config.json``, sorted (one listing).

    Raises:
        DatasetNotFoundError: the folder does not exist.
    """
    given = os.fspath(checkpoint_folder)
    folder = Location(given, storage_options)
    if not folder.exists():
        raise DatasetNotFoundError(f"checkpoint folder {folder.url} does not exist")
    found = retry_remote(lambda: folder.fs.find(folder.path), folder)
    dirs = sorted({posixpath.dirname(p) for p in found if posixpath.basename(p) == "adapter_config.json"})
    return sorted(_join(folder, d, given) for d in dirs)


def _map(fn: Callable[[Any], Any], items: Sequence[Any], remote: bool) -> list[Any]:
    if not remote or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(REMOTE_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def open_checkpoints(paths: Sequence[str], storage_options: Mapping[str, Any] | None = None,
                     skip_bad: bool = False) -> tuple[list[LoRACheckpoint], list[tuple[str, str]]]:
    """Open checkpoint folders (headers only, concurrently when remote) and check they share one layout.

    Returns ``(checkpoints, skipped)``; ``skipped`` lists ``(path, reason)``
    of bad folders when ``skip_bad`` is true (each is also logged).  The first
    good checkpoint is the reference layout.

    Raises:
        CorruptDataError / ShapeMismatchError / DatasetNotFoundError: a bad folder, unless ``skip_bad``.
    """
    remote = bool(paths) and not Location(paths[0]).is_local

    def attempt(path: str) -> LoRACheckpoint | UnistoreError:
        try:
            return LoRACheckpoint(path, storage_options)
        except UnistoreError as e:
            if not skip_bad:
                raise
            return e

    opened = _map(attempt, list(paths), remote)
    good: list[LoRACheckpoint] = []
    skipped: list[tuple[str, str]] = []
    for path, item in zip(paths, opened):
        if isinstance(item, LoRACheckpoint) and good:
            try:
                item.check_like(good[0])
            except ShapeMismatchError as e:
                if not skip_bad:
                    raise
                item = e
        if isinstance(item, LoRACheckpoint):
            good.append(item)
        else:
            skipped.append((path, str(item)))
            log.warning("skipping checkpoint %s: %s", path, item)
    return good, skipped


def _read_prompts(checkpoints: Sequence[LoRACheckpoint], remote: bool) -> dict[str, dict[str, list[str]]]:
    """``{path: {"prompts": [...], "answers": [...]}}`` from each folder's optional ``prompts.json``."""

    def one(ckpt: LoRACheckpoint) -> dict[str, list[str]]:
        loc = ckpt.store.location
        path = f"{loc.path.rstrip('/')}/prompts.json"
        try:
            raw = retry_remote(lambda: loc.fs.cat_file(path), loc)
        except FileNotFoundError:
            return {"prompts": [posixpath.basename(loc.path.rstrip("/"))], "answers": []}
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise CorruptDataError(f"{ckpt.path}/prompts.json is not valid JSON ({e})") from e
        prompts = data.get("prompts", data) if isinstance(data, dict) else data
        answers = data.get("answers", []) if isinstance(data, dict) else []
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise CorruptDataError(f"{ckpt.path}/prompts.json must hold a non-empty list of strings under "
                                   "'prompts' (or be such a list)")
        return {"prompts": prompts, "answers": [a for a in answers if isinstance(a, str)]}

    return dict(zip((c.path for c in checkpoints), _map(one, list(checkpoints), remote)))


# ------------------------------------------------------------------ tokenizer
class ReferenceLoRATokenizer:
    """A small invertible LoRA tokenizer: each tensor flattened into ``token_shape`` tokens with per-token scales.

    Tensors are taken in sorted name order, flattened, zero-padded to a whole
    number of tokens, and each token divided by its largest absolute value
    (its scale; 1 for an all-zero token).  ``num_tokens`` pads (with zero
    tokens of scale 1) or refuses checkpoints that need more.

    >>> tok = ReferenceLoRATokenizer(token_shape=(8, 8))
    >>> tokens, scales = tok.tokenize(weights)          # (N, 8, 8), (N,)
    >>> tok.detokenize(tokens, scales, {k: w.shape for k, w in weights.items()})  # == weights
    """

    def __init__(self, token_shape: tuple[int, int] = (8, 8), num_tokens: int | None = None):
        self.token_shape = (int(token_shape[0]), int(token_shape[1]))
        self.num_tokens = num_tokens

    @property
    def token_size(self) -> int:
        return self.token_shape[0] * self.token_shape[1]

    def tokenize(self, weights: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens (N, H, W) float32, scales (N,) float32)`` of ``weights``.

        Raises:
            ShapeMismatchError: more than ``num_tokens`` tokens are needed.
        """
        parts = []
        for key in sorted(weights):
            value = weights[key]
            if hasattr(value, "detach"):
                value = value.detach().cpu().float().numpy()
            flat = np.asarray(value, dtype=np.float32).reshape(-1)
            pad = (-flat.size) % self.token_size
            parts.append(np.concatenate([flat, np.zeros(pad, np.float32)]) if pad else flat)
        flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        tokens = flat.reshape(-1, self.token_size)
        if self.num_tokens is not None:
            if len(tokens) > self.num_tokens:
                raise ShapeMismatchError(f"these weights need {len(tokens)} tokens of {self.token_shape}, more than "
                                         f"num_tokens={self.num_tokens}")
            tokens = np.concatenate([tokens, np.zeros((self.num_tokens - len(tokens), self.token_size), np.float32)])
        scales = np.abs(tokens).max(axis=1) if len(tokens) else np.zeros(0, np.float32)
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        return (tokens / scales[:, None]).reshape(-1, *self.token_shape).astype(np.float32), scales

    def detokenize(self, tokens: Any, scales: Any, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        """The weights back from ``tokenize``'s output, given each tensor's shape."""
        tokens = np.asarray(tokens, dtype=np.float32).reshape(-1, self.token_size)
        flat = (tokens * np.asarray(scales, dtype=np.float32)[:, None]).reshape(-1)
        out, at = {}, 0
        for key in sorted(shapes):
            n = int(np.prod(shapes[key], dtype=np.int64))
            out[key] = flat[at:at + n].reshape(tuple(shapes[key]))
            at += n + (-n) % self.token_size
        return out


def _as_float_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.float()
    return torch.from_numpy(np.ascontiguousarray(value)).float()


# ------------------------------------------------------------------ datasets
class Text2Qwen25LoRA_DeltaDataset(_TorchDataset):  # type: ignore[misc,valid-type]  # noqa: N801 - spec's name
    """LoRA checkpoints tokenized for a generator, with their text condition and delta label.

    Checkpoints are the folders below ``checkpoint_folder`` holding an
    ``adapter_config.json`` (any fsspec URL).  A sample is a dict:
    ``tokens`` (num_tokens, H, W) float32, ``scales`` float32,
    ``condition_ids`` / ``attention_mask`` (max_text_length,) long,
    ``delta`` (hidden_size,) float32 and ``checkpoint_path`` (str).

    Only checkpoints with a cached delta are kept (``require_delta=True``, as
    the spec does); with ``require_delta=False`` the rest get
    :func:`fallback_delta` of ``fallback_delta_norm``.  Every folder is
    checked when the dataset is built (headers only): a malformed
    ``adapter_config.json``, missing LoRA tensors or shapes that disagree
    across checkpoints raise a typed error naming the folder, or with
    ``skip_bad=True`` are reported (``self.skipped``) and left out.

    >>> ds = Text2Qwen25LoRA_DeltaDataset("s3://bucket/teacher_checkpoints", ReferenceLoRATokenizer(),
    ...                                   text_tokenizer, DeltaCache("deltas"), storage_options={...})
    >>> loader = DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn, num_workers=4)

    Raises:
        DatasetNotFoundError: the folder does not exist.
        CorruptDataError / ShapeMismatchError: a bad checkpoint (unless ``skip_bad``).
    """

    def __init__(self, checkpoint_folder: str | os.PathLike[str], lora_tokenizer: Any, text_tokenizer: Any,
                 delta_cache: DeltaCache, max_text_length: int = 512, condition_type: str = "prompt", *,
                 storage_options: Mapping[str, Any] | None = None, require_delta: bool = True,
                 fallback_delta_norm: float = 0.0, skip_bad: bool = False, verbose: bool = True):
        from unistore._optional import require

        require("torch", "the LoRA datasets")
        if condition_type not in ("prompt", "prompt_answer"):
            raise ValueError(f"condition_type must be 'prompt' or 'prompt_answer', got {condition_type!r}")
        # the folder's Location carries the storage options: pickled into DataLoader workers, its secrets are
        # handed off outside the pickle (unistore.storage.secrets), as every other Location's are
        self._folder = Location(str(checkpoint_folder), storage_options)
        self.checkpoint_folder = as_path(checkpoint_folder)
        self.lora_tokenizer = lora_tokenizer
        self.text_tokenizer = text_tokenizer
        self.delta_cache = delta_cache
        self.max_text_length = max_text_length
        self.condition_type = condition_type
        self.fallback_delta_norm = fallback_delta_norm
        self._remote = not self._folder.is_local

        self.checkpoint_paths = self._find_checkpoints()
        self.all_deltas = delta_cache.get_many([str(p) for p in self.checkpoint_paths])
        self.hidden_size = delta_cache.hidden_size or DEFAULT_HIDDEN_SIZE
        wanted = [str(p) for p in self.checkpoint_paths if not require_delta or str(p) in self.all_deltas]
        self._checkpoints, self.skipped = open_checkpoints(wanted, self._folder.storage_options, skip_bad)
        self._by_path = {c.path: c for c in self._checkpoints}
        self.valid_checkpoints = [as_path(c.path) for c in self._checkpoints]
        if verbose:
            with_delta = sum(str(p) in self.all_deltas for p in self.valid_checkpoints)
            print(f"Found {with_delta}/{len(self.checkpoint_paths)} checkpoints with deltas")
        self.conditions = self._load_conditions()

    # the seed document's hooks: a subclass may override any of them
    def _find_checkpoints(self) -> list[Path]:
        """Every folder below ``checkpoint_folder`` holding an ``adapter_config.json``, sorted (one listing)."""
        return [as_path(p) for p in find_checkpoints(str(self.checkpoint_folder), self._folder.storage_options)]

    def _load_conditions(self) -> dict[str, dict[str, list[str]]]:
        """``{str(checkpoint path): {"prompts": [...], "answers": [...]}}`` from each folder's ``prompts.json``
        (the folder's name when there is none)."""
        return _read_prompts(self._checkpoints, self._remote)

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """The LoRA tensors of the checkpoint at ``path`` as ``{name: float tensor}``, sorted by name (read
        through the storage layer: one ranged read per tensor, from its safetensors header)."""
        ckpt = self._by_path.get(str(path))
        if ckpt is None:
            ckpt = LoRACheckpoint(str(path), self._folder.storage_options)
        return ckpt.read_weights()

    def __len__(self) -> int:
        return len(self._checkpoints)

    def get_checkpoint_path(self, idx: int) -> str:
        return self._checkpoints[idx].path

    def _text(self, path: str) -> str:
        cond = self.conditions[path]
        if self.condition_type == "prompt_answer" and cond["answers"]:
            return cond["prompts"][0] + "\n" + cond["answers"][0]
        return cond["prompts"][0]

    def _sample(self, idx: int, weights: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        path = str(self.valid_checkpoints[idx])
        tokens, scales = self.lora_tokenizer.tokenize(weights)
        encoded = self.text_tokenizer(self._text(path), max_length=self.max_text_length, padding="max_length",
                                      truncation=True, return_tensors="pt")
        delta = self.all_deltas.get(path)
        delta_t = (torch.from_numpy(np.array(delta, dtype=np.float32)) if delta is not None
                   else fallback_delta(self.hidden_size, self.fallback_delta_norm))
        return {
            "tokens": _as_float_tensor(tokens),
            "scales": _as_float_tensor(scales),
            "condition_ids": encoded["input_ids"].squeeze(0).long(),
            "attention_mask": encoded["attention_mask"].squeeze(0).long(),
            "delta": delta_t,
            "checkpoint_path": path,
        }

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} of a dataset of {len(self)} checkpoints")
        idx %= len(self)
        return self._sample(idx, self._load_checkpoint(self.valid_checkpoints[idx]))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of samples; remote checkpoints are read concurrently."""
        idx = [int(i) % len(self) for i in indices]
        weights = _map(self._load_checkpoint, [self.valid_checkpoints[i] for i in idx], self._remote)
        return [self._sample(i, w) for i, w in zip(idx, weights)]

    @staticmethod
    def collate_fn(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Stack a list of samples: tokens, scales, condition_ids, attention_mask, delta (and checkpoint paths)."""
        import torch

        out: dict[str, Any] = {k: torch.stack([b[k] for b in batch])
               for k in ("tokens", "scales", "condition_ids", "attention_mask", "delta")}
        out["checkpoint_path"] = [b["checkpoint_path"] for b in batch]
        return out


def _path_of(base: Any, idx: int) -> str | None:
    """A base dataset's checkpoint path for ``idx``: its method/attributes first, the sample second."""
    if hasattr(base, "get_checkpoint_path"):
        return _str_or_none(base.get_checkpoint_path(idx))
    for attr in ("valid_checkpoints", "checkpoint_paths"):
        paths = getattr(base, attr, None)
        if paths is not None and len(paths) == len(base):
            return _str_or_none(paths[idx])
    samples = getattr(base, "samples", None)
    if samples is not None and idx < len(samples) and isinstance(samples[idx], Mapping) and "path" in samples[idx]:
        return str(samples[idx]["path"])
    sample = base[idx]
    if isinstance(sample, Mapping):
        return _str_or_none(sample.get("checkpoint_path"))
    if isinstance(sample, tuple) and len(sample) >= 3:
        return _str_or_none(sample[2])
    return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _deltas_for(cache: DeltaCache, paths: Iterable[str | None]) -> dict[str, np.ndarray]:
    return cache.get_many([p for p in paths if p is not None])


class DeltaAugmentedDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """Adds the delta label to a dataset of ``(tokens, condition, checkpoint_path)`` samples.

    The checkpoint path of sample ``i`` comes from the base dataset's
    ``get_checkpoint_path(i)``, ``valid_checkpoints`` / ``checkpoint_paths``, or
    the sample itself (third item, or ``"checkpoint_path"``).  With
    ``require_delta`` samples without a cached delta are left out; without it
    they get :func:`fallback_delta` (zeros by default).  Samples are
    ``(tokens, condition, delta)``.
    """

    def __init__(self, base_dataset: Any, delta_cache: DeltaCache, require_delta: bool = True,
                 fallback_delta_norm: float = 0.0, verbose: bool = True):
        from unistore._optional import require

        require("torch", "the LoRA datasets")
        self.base_dataset = base_dataset
        self.delta_cache = delta_cache
        self.require_delta = require_delta
        self.fallback_delta_norm = fallback_delta_norm
        paths = [_path_of(base_dataset, i) for i in range(len(base_dataset))]
        found = _deltas_for(delta_cache, paths)
        self.valid_indices: list[int] = []
        self.delta_map: dict[int, np.ndarray | None] = {}
        for idx, path in enumerate(paths):
            if path is not None and path in found:
                self.valid_indices.append(idx)
                self.delta_map[idx] = found[path]
            elif not require_delta:
                self.valid_indices.append(idx)
                self.delta_map[idx] = None
        self.hidden_size = delta_cache.hidden_size or DEFAULT_HIDDEN_SIZE
        if verbose:
            print(f"DeltaAugmentedDataset: {len(self.valid_indices)}/{len(base_dataset)} samples have deltas")

    def __len__(self) -> int:
        return len(self.valid_indices)

    def __getitem__(self, idx: int) -> tuple[Any, Any, Any]:
        import torch

        real = self.valid_indices[idx]
        sample = self.base_dataset[real]
        delta = self.delta_map.get(real)
        delta_t = (torch.from_numpy(np.array(delta, dtype=np.float32)) if delta is not None
                   else fallback_delta(self.hidden_size, self.fallback_delta_norm))
        if isinstance(sample, Mapping):
            return sample["tokens"], sample.get("condition_ids", sample.get("condition")), delta_t
        return sample[0], sample[1], delta_t

    @staticmethod
    def collate_fn(batch: Sequence[tuple[Any, Any, Any]]) -> dict[str, Any]:
        """``{"tokens": (B, ...), "condition": (B, ...) or list, "delta": (B, hidden_size)}``."""
        import torch

        tokens, conditions, deltas = zip(*batch)
        return {
            "tokens": torch.stack(list(tokens)),
            "condition": torch.stack(list(conditions)) if isinstance(conditions[0], torch.Tensor)
            else list(conditions),
            "delta": torch.stack(list(deltas)),
        }


class DnDDatasetWithDelta(_TorchDataset):  # type: ignore[misc,valid-type]
    """Wraps an existing DnD dataset and inserts the delta after the condition.

    Tuple samples ``(tokens, condition, ...)`` become ``(tokens, condition,
    delta, ...)``; dict samples gain ``"delta"``; anything else becomes
    ``(sample, delta)``.  A sample whose checkpoint has no delta gets
    :func:`fallback_delta` of ``fallback_delta_norm`` (zeros by default).

    ``delta_cache_dir`` is a :class:`DeltaCache` or its root URL.
    """

    def __init__(self, base_dataset: Any, delta_cache_dir: str | os.PathLike[str] | DeltaCache = "deltas",
                 fallback_delta_norm: float = 0.0, *, catalog_url: str | None = None,
                 storage_options: Mapping[str, Any] | None = None):
        from unistore._optional import require

        require("torch", "the LoRA datasets")
        self.base_dataset = base_dataset
        self.delta_cache = (delta_cache_dir if isinstance(delta_cache_dir, DeltaCache)
                            else DeltaCache(delta_cache_dir, catalog_url=catalog_url,
                                            storage_options=storage_options))
        self.fallback_delta_norm = fallback_delta_norm
        self._build_path_index()
        self.all_deltas = _deltas_for(self.delta_cache, self.idx_to_path.values())
        self.hidden_size = self.delta_cache.hidden_size or DEFAULT_HIDDEN_SIZE

    def _build_path_index(self) -> None:
        """Map dataset indices to checkpoint paths (``checkpoint_paths`` or ``samples[i]["path"]``)."""
        self.idx_to_path: dict[int, str] = {}
        base = self.base_dataset
        # the paths of the samples the base serves: a dataset that keeps only some checkpoints (those with a
        # delta) lists them in valid_checkpoints, so checkpoint_paths is used only when it has one per sample
        paths = next((getattr(base, attr) for attr in ("valid_checkpoints", "checkpoint_paths")
                      if getattr(base, attr, None) is not None and len(getattr(base, attr)) == len(base)), None)
        if paths is not None:
            self.idx_to_path = {i: str(p) for i, p in enumerate(paths)}
        elif hasattr(self.base_dataset, "samples"):
            for i, sample in enumerate(self.base_dataset.samples):
                if isinstance(sample, Mapping) and "path" in sample:
                    self.idx_to_path[i] = str(sample["path"])

    def __len__(self) -> int:
        return len(self.base_dataset)

    def _delta(self, idx: int) -> Any:
        import torch

        path = self.idx_to_path.get(idx)
        if path is not None and path in self.all_deltas:
            return torch.from_numpy(np.array(self.all_deltas[path], dtype=np.float32))
        return fallback_delta(self.hidden_size, self.fallback_delta_norm)

    def __getitem__(self, idx: int) -> Any:
        base_output = self.base_dataset[idx]
        delta = self._delta(idx)
        if isinstance(base_output, tuple):
            return base_output[:2] + (delta,) + base_output[2:]
        if isinstance(base_output, dict):
            return {**base_output, "delta": delta}
        return base_output, delta

    def collate_fn_train(self, batch: Sequence[Any]) -> dict[str, Any]:
        """Stack tuple samples into tokens/condition/delta, or every tensor of dict samples."""
        import torch

        if isinstance(batch[0], tuple):
            return {
                "tokens": torch.stack([b[0] for b in batch]),
                "condition": torch.stack([b[1] for b in batch]),
                "delta": torch.stack([b[2] for b in batch]),
            }
        if isinstance(batch[0], dict):
            return {k: torch.stack([b[k] for b in batch]) for k in batch[0] if isinstance(batch[0][k], torch.Tensor)}
        raise TypeError(f"collate_fn_train takes tuple or dict samples, got {type(batch[0]).__name__}")


def wrap_dnd_dataset(dataset_class: Callable[..., Any], delta_cache_dir: str | os.PathLike[str] | DeltaCache = "deltas",
                     **dataset_kwargs: Any) -> DnDDatasetWithDelta:
    """Build ``dataset_class(**dataset_kwargs)`` and wrap it in :class:`DnDDatasetWithDelta`."""
    return DnDDatasetWithDelta(dataset_class(**dataset_kwargs), delta_cache_dir)


def create_dataloader(checkpoint_folder: str | os.PathLike[str], lora_tokenizer: Any, text_tokenizer: Any,
                      delta_cache: DeltaCache, batch_size: int = 8, num_workers: int = 4, shuffle: bool = True,
                      condition_type: str = "prompt", max_text_length: int = 512, **dataset_kwargs: Any) -> Any:
    """A ``DataLoader`` over :class:`Text2Qwen25LoRA_DeltaDataset` with its ``collate_fn``.

    Memory is pinned when CUDA is available.  Extra keyword arguments
    (``storage_options``, ``require_delta``, ``skip_bad``, ...) go to the dataset.
    """
    import torch
    from torch.utils.data import DataLoader

    dataset = Text2Qwen25LoRA_DeltaDataset(checkpoint_folder, lora_tokenizer, text_tokenizer, delta_cache,
                                           max_text_length=max_text_length, condition_type=condition_type,
                                           **dataset_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          collate_fn=dataset.collate_fn, pin_memory=torch.cuda.is_available())
