"""The MNIST family of data sets: from their files (checked) to a copy kept on the device.

``idx`` (the file format), ``catalog`` (names, files, folders, checksums, addresses),
``download``, ``read`` (a whole data set, every file checked) and ``device`` (subsets,
folds, the device copy).
"""
from .catalog import DATASETS, EMNIST_SPLITS, DatasetInfo, dataset_info
from .device import DeviceData, fold_indices, pixel_stats, subset_indices, to_device
from .download import download_dataset
from .idx import DataError, parse_idx, read_idx_file, write_idx
from .read import RawDataset, content_sha256, load_dataset

__all__ = ["DATASETS", "EMNIST_SPLITS", "DataError", "DatasetInfo", "DeviceData", "RawDataset",
           "content_sha256", "dataset_info", "download_dataset", "fold_indices", "load_dataset",
           "parse_idx", "pixel_stats", "read_idx_file", "subset_indices", "to_device",
           "write_idx"]
