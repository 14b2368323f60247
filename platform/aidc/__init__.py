"""aidc: a Ray-based platform to preprocess data, train, tune and serve models on your own cluster."""

from aidc.errors import AidcError, ConfigError, DataError, RegistryError, RequestError
from aidc.malloc import tune_malloc

tune_malloc()  # glibc's allocator set up for PyTorch on CPU (see aidc/malloc.py): every process that imports aidc

__version__ = "0.1.0"
__all__ = ["AidcError", "ConfigError", "DataError", "RegistryError", "RequestError", "__version__"]
