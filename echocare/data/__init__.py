"""The data layer: data specs, readers, leak-free splits, federated partitions, site checks.

Importable without torch (numpy + Pillow; PyAV and pydicom are imported only to read clips and
DICOM), because the torch-free edge runtime reads its inputs with the same code::

    from echocare.data import open_data, split_train_val
    data = open_data("busi:/data/Dataset_BUSI_with_GT?limit=90&seed=0")
    train, val = split_train_val(data, val_fraction=0.2, seed=0)
"""

from echocare.data.base import Problem, Sample, SiteData, UnreadableImage
from echocare.data.spec import KIND_OPTIONS, open_data, parse_spec
from echocare.data.split import partition, split_train_val

__all__ = [
    "KIND_OPTIONS",
    "Problem",
    "Sample",
    "SiteData",
    "UnreadableImage",
    "open_data",
    "parse_spec",
    "partition",
    "split_train_val",
]
