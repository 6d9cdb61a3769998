"""Training datasets over the storage layer and the catalog.

>>> from unistore.datasets import ClusterLabeledDataset, JASPERSteeringDataset, create_loader, set_epoch
>>> loader = create_loader("output/dataset", "train", batch_size=32, num_workers=4)

Every class reads through :class:`~unistore.TensorStore` (one ``take`` per
array per batch) and the catalog; :class:`StoreDataset` and
:class:`StoreSampler` are the pieces to build your own on.
"""

from unistore.datasets.base import Batch, StoreDataset, collate
from unistore.datasets.cluster_labeled import ClusterLabeledDataset
from unistore.datasets.deltas import DeltaCache
from unistore.datasets.factory import (
    DATASET_CACHE,
    ClassificationDataset,
    DatasetConfig,
    DatasetLoader,
    create_dataset,
    dataset_url,
    get_dataset_config,
    list_available_datasets,
    register_dataset,
    register_loader,
    write_classification_store,
)
from unistore.datasets.importers import import_cifar, import_mnist
from unistore.datasets.jasper import JASPERSteeringDataset, compute_steering_probs, convert_pt_to_hdf5, copy_dataset
from unistore.datasets.loader import create_loader, make_loader, set_epoch, validate_first_batch
from unistore.datasets.lora import (
    DeltaAugmentedDataset,
    DnDDatasetWithDelta,
    ReferenceLoRATokenizer,
    Text2Qwen25LoRA_DeltaDataset,
    create_dataloader,
    wrap_dnd_dataset,
)
from unistore.datasets.metadata import DatasetMetadata, dataset_usage_history, track_dataset_usage
from unistore.datasets.sampler import StoreSampler
from unistore.errors import DatasetNotFoundError

__all__ = [
    "Batch",
    "StoreDataset",
    "StoreSampler",
    "collate",
    "ClusterLabeledDataset",
    "JASPERSteeringDataset",
    "compute_steering_probs",
    "convert_pt_to_hdf5",
    "copy_dataset",
    "DeltaCache",
    "DeltaAugmentedDataset",
    "DnDDatasetWithDelta",
    "ReferenceLoRATokenizer",
    "Text2Qwen25LoRA_DeltaDataset",
    "create_dataloader",
    "wrap_dnd_dataset",
    "DATASET_CACHE",
    "ClassificationDataset",
    "DatasetConfig",
    "DatasetLoader",
    "DatasetNotFoundError",
    "create_dataset",
    "dataset_url",
    "get_dataset_config",
    "list_available_datasets",
    "register_dataset",
    "register_loader",
    "write_classification_store",
    "import_cifar",
    "import_mnist",
    "DatasetMetadata",
    "dataset_usage_history",
    "track_dataset_usage",
    "create_loader",
    "make_loader",
    "set_epoch",
    "validate_first_batch",
]
