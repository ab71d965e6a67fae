"""Datasets and their federated partitioning.

Loaders return ``(x_train, y_train, x_test, y_test)``: normalised float32 (N, C, H, W) images
and int64 labels, decoded once per process and read-only, since every simulated client in a
process shares them. The modules, each named for what it holds:

- ``idx``: the IDX file format; ``fashion_mnist``: Fashion-MNIST's files, found or fetched;
- ``download``: atomic downloads checked by md5; ``cifar10``: the CIFAR-10 archive;
- ``registry``: the datasets a run can name, and sklearn's digits;
- ``partition``: flwr-datasets' partitioners, one client's train / validation indices;
- ``loaders``: device-resident mini-batches of the shared arrays.
"""

from fl_maestro.data.arrays import DatasetArrays
from fl_maestro.data.cifar10 import (
    CIFAR10_ARCHIVE, CIFAR10_MD5, CIFAR10_MEAN, CIFAR10_STD, CIFAR10_TRAIN_BATCHES, CIFAR10_URL,
    DEFAULT_CIFAR10_ROOT, load_cifar10,
)
from fl_maestro.data.download import download_file
from fl_maestro.data.fashion_mnist import (
    FASHION_MNIST_FILES, FASHION_MNIST_MD5, FASHION_MNIST_MEAN, FASHION_MNIST_PACKAGE,
    FASHION_MNIST_ROOT, FASHION_MNIST_STD, FASHION_MNIST_URL, fashion_mnist_cache_dir,
    fashion_mnist_folder, load_fashion_mnist,
)
from fl_maestro.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
from fl_maestro.data.loaders import Batches, make_loader
from fl_maestro.data.partition import (
    DIRICHLET_MIN_PARTITION_SIZES, PARTITIONERS, client_partition, partition_indices,
    validation_rows,
)
from fl_maestro.data.registry import DATASET_SHAPES, NUM_CLASSES, load_dataset, load_digits

__all__ = [
    "Batches", "CIFAR10_ARCHIVE", "CIFAR10_MD5", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_TRAIN_BATCHES",
    "CIFAR10_URL", "DATASET_SHAPES", "DEFAULT_CIFAR10_ROOT", "DIRICHLET_MIN_PARTITION_SIZES",
    "DatasetArrays", "FASHION_MNIST_FILES", "FASHION_MNIST_MD5", "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE", "FASHION_MNIST_ROOT", "FASHION_MNIST_STD", "FASHION_MNIST_URL",
    "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "NUM_CLASSES", "PARTITIONERS", "client_partition",
    "download_file", "fashion_mnist_cache_dir", "fashion_mnist_folder", "load_cifar10",
    "load_dataset", "load_digits", "load_fashion_mnist", "make_loader", "partition_indices",
    "read_idx", "validation_rows",
]
