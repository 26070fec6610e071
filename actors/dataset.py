"""The data layer lives in models/data.py (Ray-free: shared by local training, Ray Data's decode stage, the sweep and
the tests); these names stay importable from here for the callers that use them."""

from models.data import (  # noqa: F401
    DIGITS_SHAPE,
    SHAPE_KEY,
    DataConfig,
    DatasetInfo,
    DataSplits,
    colour_images,
    decode_image,
    decode_images,
    encode_labels,
    index_image_folder,
    is_image_folder,
    load_tensors,
    parquet_files,
    prepare_data,
    read_index,
    split_parquet,
    validate_parquet,
    write_digits,
    write_parquet,
)
