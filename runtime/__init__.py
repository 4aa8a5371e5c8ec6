"""Runtime: the compiled model, the artifact format, loading, benchmarking, RPC."""

from .artifact import load, read_manifest, save
from .model import ArtifactError, CompiledModel, InputError, IOSpec, KernelTime, Latency, Profile
from .threads import num_threads, set_num_threads

__all__ = ["CompiledModel", "IOSpec", "Latency", "Profile", "KernelTime", "InputError",
           "ArtifactError", "load", "save", "read_manifest", "num_threads", "set_num_threads"]
