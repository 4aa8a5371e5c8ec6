"""The artifact: one self-contained folder that a device can run.

::

    model.so        the built program (a shared library for the target's architecture)
    params.npz      the parameters, numpy's .npz (read with allow_pickle=False)
    manifest.json   inputs, outputs, target, slimfx and TVM versions, the graph summary,
                    the parity check, and a SHA-256 of each file

Loading checks the manifest's format, the TVM version (the library is native code built
against one TVM runtime), every file's checksum, and the parameters' names and shapes,
and says exactly what is wrong when one of them fails.  Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .model import ArtifactError, CompiledModel

__all__ = ["FORMAT", "FORMAT_VERSION", "save", "load", "read_manifest"]

FORMAT = "slimfx-artifact"
FORMAT_VERSION = 1
LIBRARY = "model.so"
PARAMS = "params.npz"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _export_library(model: CompiledModel, dest: Path) -> None:
    if model._library_path is not None:  # loaded from an artifact: the library is a file
        shutil.copyfile(model._library_path, dest)
        return
    from slimfx.lowering.targets import resolve_target
    from slimfx.lowering.toolchain import fcompile_for

    info = resolve_target(model.target)
    fcompile = fcompile_for(info)
    if fcompile is None:
        model._executable.export_library(str(dest))
    else:
        model._executable.export_library(str(dest), fcompile=fcompile)


def save(model: CompiledModel, path) -> str:
    """Write ``model`` to the folder ``path`` (created; existing artifact files replaced)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _export_library(model, folder / LIBRARY)
    names = model.param_names
    np.savez(folder / PARAMS, **{f"p{i}": p for i, p in enumerate(model._params)})
    manifest = dict(model.manifest)
    manifest["format"], manifest["format_version"] = FORMAT, FORMAT_VERSION
    manifest["params"] = names
    manifest["files"] = {name: _sha256(folder / name) for name in (LIBRARY, PARAMS)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return str(folder)


def read_manifest(path) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked for format and versions."""
    import tvm

    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"no artifact at {folder}: not a folder")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{folder} is not a slimfx artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"corrupt artifact {folder}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a slimfx artifact manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact {folder} has format version {version}; this slimfx reads "
                            f"version {FORMAT_VERSION}: rebuild it with this slimfx")
    built_tvm = manifest.get("versions", {}).get("tvm")
    if built_tvm != tvm.__version__:
        raise ArtifactError(f"artifact {folder} was built with TVM {built_tvm}, this is TVM "
                            f"{tvm.__version__}: its native library is not compatible; rebuild it")
    missing = [k for k in ("inputs", "outputs", "params", "target", "files") if k not in manifest]
    if missing:
        raise ArtifactError(f"corrupt artifact {folder}: manifest lacks {', '.join(missing)}")
    return manifest


def load(path, *, remote=None) -> CompiledModel:
    """Load an artifact folder written by :meth:`CompiledModel.save`.

    ``remote``: an RPC session (:func:`slimfx.runtime.rpc.connect`): the library is
    uploaded and the model runs on that device.
    """
    import tvm

    folder = Path(path)
    manifest = read_manifest(folder)
    for name, digest in manifest["files"].items():
        f = folder / name
        if not f.is_file():
            raise ArtifactError(f"corrupt artifact {folder}: {name} is missing")
        if _sha256(f) != digest:
            raise ArtifactError(f"corrupt artifact {folder}: {name} does not match its checksum "
                                "in the manifest (modified or truncated)")
    try:
        with np.load(folder / PARAMS, allow_pickle=False) as z:
            params = [z[f"p{i}"] for i in range(len(manifest["params"]))]
    except (KeyError, ValueError, OSError) as e:
        raise ArtifactError(f"corrupt artifact {folder}: cannot read {PARAMS}: {e}") from e
    shapes = manifest.get("param_shapes")
    if shapes is not None:
        for name, p, shape in zip(manifest["params"], params, shapes):
            if list(p.shape) != list(shape):
                raise ArtifactError(f"corrupt artifact {folder}: parameter '{name}' has shape "
                                    f"{list(p.shape)}, the manifest says {shape}")
    lib_path = str(folder / LIBRARY)
    if remote is not None:
        remote.upload(lib_path)
        lib = remote.load_module(LIBRARY)
        return CompiledModel(lib, params, manifest, device=remote.cpu(), library_path=lib_path)
    from slimfx.lowering.targets import resolve_target

    if resolve_target(manifest["target"]).local_device() is None:
        triple = manifest["target"].get("mtriple", manifest["target"]["kind"])
        raise ArtifactError(f"artifact {folder} was built for {triple} and cannot run on this "
                            "machine; load it with remote=<RPC session> to run it on the device")
    try:
        lib = tvm.runtime.load_module(lib_path)
    except Exception as e:  # TVM raises its own error types
        raise ArtifactError(f"cannot load {lib_path}: {e}") from e
    return CompiledModel(lib, params, manifest, library_path=lib_path)
