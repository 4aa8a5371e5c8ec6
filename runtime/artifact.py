"""The artifact: one self-contained folder that a device can run.

::

    model.so        the built program (a shared library for the target's architecture)
    params.npz      the parameters, numpy's .npz (read with allow_pickle=False)
    manifest.json   inputs, outputs, target, slimfx and TVM versions, the graph summary,
                    the parity check, and a SHA-256 of each file
    cuda-*.bin      CUDA targets built on a machine without a GPU driver: the kernels,
                    compiled by slimfx (TVM keeps their source in model.so there and would
                    compile it at load time; slimfx hands it these binaries instead)

Loading checks the manifest's format, the TVM version (the library is native code built
against one TVM runtime), every file's checksum, and the parameters' names and shapes,
and says exactly what is wrong when one of them fails.  Nothing is unpickled.

Compact parameters (format version 2).  A ``uint8`` parameter (the codebook indices of
weight sharing, :mod:`slimfx.passes.share_weights`) is stored in as few bits as its
largest value needs: bit-packed (``index_coding="bitpack"``, the default) or, with
``index_coding="huffman"``, Huffman-coded where that is smaller (canonical code, lengths
limited to 16 bits, the stream cut in chunks of :data:`HUFFMAN_CHUNK` symbols whose bit
offsets are stored in front of it so that decoding is vectorised).  A version-2 ``params.npz`` holds one byte array,
``blob``: ``param_layout`` in the manifest gives each parameter's byte range, dtype and
shape (no per-array headers: a codebook of 16 floats costs 64 bytes, not ~300), and
``param_coding`` each coded parameter's codec, bit width, count and shape; loading
decodes them, so the program sees ordinary ``uint8`` tensors.  An artifact with no coded
parameter is written as version 1 (one ``.npy`` per parameter).

>>> v = np.array([3, 0, 15, 7, 7], dtype=np.uint8)
>>> packed = pack_bits(v, 4)
>>> packed.nbytes, unpack_bits(packed, 4, 5).tolist()
(3, [3, 0, 15, 7, 7])
>>> lengths = huffman_code_lengths(np.bincount(v, minlength=16))
>>> stream, offsets, nbits = huffman_encode(v, lengths)
>>> huffman_decode(stream, offsets, lengths, len(v)).tolist(), nbits
([3, 0, 15, 7, 7], 10)
"""

from __future__ import annotations

import hashlib
import heapq
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .model import ArtifactError, CompiledModel

__all__ = ["FORMAT", "FORMAT_VERSION", "save", "load", "read_manifest", "pack_bits",
           "unpack_bits", "index_bits", "huffman_code_lengths", "huffman_encode",
           "huffman_decode", "encode_indices", "HUFFMAN_CHUNK", "HUFFMAN_MAX_LENGTH"]

FORMAT = "slimfx-artifact"
FORMAT_VERSION = 2  # the newest format this slimfx writes and reads
READS = (1, 2)  # 1: plain parameters; 2: adds param_coding (bit-packed / Huffman indices)
LIBRARY = "model.so"
PARAMS = "params.npz"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- index codecs
HUFFMAN_CHUNK = 4096  # symbols per independently decodable chunk (one 32-bit offset each)
HUFFMAN_MAX_LENGTH = 16  # longest code; keeps the decoding table at 2**16 entries


def index_bits(values: np.ndarray) -> int:
    """Bits per value that a ``uint8`` array needs: its largest value's bit length (>= 1)."""
    return max(1, int(values.max()).bit_length()) if values.size else 1


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``uint8`` values below ``2**bits`` -> ``ceil(n * bits / 8)`` bytes, MSB first."""
    values = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    if values.size and int(values.max()) >= 1 << bits:
        raise ValueError(f"pack_bits: value {int(values.max())} does not fit in {bits} bits")
    planes = np.unpackbits(values[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``count`` ``uint8`` values."""
    need = (count * bits + 7) // 8
    if packed.size != need:
        raise ValueError(f"unpack_bits: {count} values of {bits} bits need {need} bytes, "
                         f"got {packed.size}")
    planes = np.unpackbits(packed)[:count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits:] = planes
    return np.packbits(full, axis=1).reshape(-1)


def _huffman_lengths_unlimited(counts: np.ndarray) -> np.ndarray:
    used = [int(s) for s in np.flatnonzero(counts)]
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    # heap of (weight, tie-breaker, symbols in the subtree); each merge deepens its symbols
    heap = [(int(counts[s]), i, [s]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, tie, a + b))
        tie += 1
    return lengths


def huffman_code_lengths(counts, limit: int = HUFFMAN_MAX_LENGTH) -> np.ndarray:
    """Huffman code length of each symbol (0 for symbols that never occur).

    Built with a heap; when the longest code would exceed ``limit`` bits, the counts are
    flattened (``c // 2 + 1``, as bzip2 does) and the code rebuilt: still a prefix code,
    a little longer than optimal, and never more than ``limit`` bits per symbol.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError("huffman_code_lengths: counts must be a non-empty 1-D array >= 0")
    if not counts.any():
        return np.zeros(len(counts), dtype=np.int64)
    work = counts.copy()
    while True:
        lengths = _huffman_lengths_unlimited(work)
        if lengths.max() <= limit:
            return lengths
        work = np.where(work > 0, work // 2 + 1, 0)


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray,
                   chunk: int = HUFFMAN_CHUNK) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode ``uint8`` symbols with the canonical code of ``lengths``.

    Returns the byte stream, the bit offset of every ``chunk``-th symbol (``uint32``) and
    the number of coded bits.
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64)
    ln = lengths[symbols]
    if symbols.size and (ln == 0).any():
        bad = int(symbols[np.argmax(ln == 0)])
        raise ValueError(f"huffman_encode: symbol {bad} has no code (count 0 in the table)")
    codes = _canonical_codes(lengths)[symbols]
    ends = np.cumsum(ln)
    starts = ends - ln
    total = int(ends[-1]) if symbols.size else 0
    if total >= 1 << 32:
        raise ValueError("huffman_encode: more than 2**32 coded bits; split the tensor")
    owner = np.repeat(np.arange(symbols.size), ln)
    k = np.arange(total) - starts[owner]
    bit = (codes[owner] >> (ln[owner] - 1 - k)) & 1
    return np.packbits(bit.astype(np.uint8)), starts[::chunk].astype(np.uint32), total


def huffman_decode(stream: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, count: int,
                   chunk: int = HUFFMAN_CHUNK) -> np.ndarray:
    """Decode ``count`` symbols (all chunks at once, one symbol per chunk per step)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    top = int(lengths.max())
    if not 1 <= top <= 24:
        raise ValueError(f"huffman_decode: code lengths must be in 1..24, longest is {top}")
    n_chunks = (count + chunk - 1) // chunk
    if len(offsets) != n_chunks:
        raise ValueError(f"huffman_decode: {count} symbols need {n_chunks} chunk offsets, "
                         f"got {len(offsets)}")
    table_sym = np.zeros(1 << top, dtype=np.uint8)
    table_len = np.zeros(1 << top, dtype=np.int64)
    codes = _canonical_codes(lengths)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (top - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (top - int(lengths[s]))
        table_sym[lo:hi], table_len[lo:hi] = s, lengths[s]
    data = np.concatenate([np.asarray(stream, dtype=np.uint8), np.zeros(4, np.uint8)]).astype(np.int64)
    last_byte = len(data) - 4
    pos = np.asarray(offsets, dtype=np.int64).copy()
    out = np.zeros((n_chunks, chunk), dtype=np.uint8)
    mask = (1 << top) - 1
    steps = min(chunk, count)
    for step in range(steps):
        byte = np.minimum(pos >> 3, last_byte)
        window = (data[byte] << 24) | (data[byte + 1] << 16) | (data[byte + 2] << 8) | data[byte + 3]
        w = (window >> (32 - (pos & 7) - top)) & mask
        out[:, step] = table_sym[w]
        pos += table_len[w]
    return out.reshape(-1)[:count].copy()


def _huffman_bytes(stream: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One stored array: the chunk offsets (little-endian uint32), then the stream."""
    return np.concatenate([offsets.astype("<u4").view(np.uint8), stream])


def encode_indices(p: np.ndarray, coding: str) -> tuple[np.ndarray, dict] | None:
    """How the artifact stores a ``uint8`` array: ``(stored bytes, manifest entry)``, or
    ``None`` when it stays as it is (not uint8, empty, 8 bits wide with ``bitpack``, or
    ``coding="none"``).  ``huffman`` falls back to bit-packing where that is smaller."""
    if p.dtype != np.uint8 or p.size == 0 or coding == "none":
        return None
    bits = index_bits(p)
    entry = {"dtype": "uint8", "shape": list(p.shape), "count": int(p.size), "bits": bits}
    packed = pack_bits(p, bits) if bits < 8 else None
    if coding == "huffman":
        counts = np.bincount(p.reshape(-1), minlength=1 << bits)
        lengths = huffman_code_lengths(counts)
        stream, offsets, nbits = huffman_encode(p, lengths)
        stored = _huffman_bytes(stream, offsets)
        if packed is None or stored.size < packed.size:
            if not np.array_equal(huffman_decode(stream, offsets, lengths, p.size), p.reshape(-1)):
                raise ArtifactError("Huffman coding of a parameter did not round-trip")  # a bug
            entry.update(codec="huffman", lengths=[int(v) for v in lengths], coded_bits=nbits,
                         chunk=HUFFMAN_CHUNK, chunks=int(offsets.size))
            return stored, entry
    if packed is None:
        return None  # 8 bits wide: nothing to gain
    entry["codec"] = "bitpack"
    return packed, entry


def _decode_param(data: np.ndarray, entry: dict, folder: Path, name: str) -> np.ndarray:
    codec = entry.get("codec")
    try:
        count, bits, shape = int(entry["count"]), int(entry["bits"]), [int(s) for s in entry["shape"]]
        if codec == "bitpack":
            flat = unpack_bits(data, bits, count)
        elif codec == "huffman":
            chunks = int(entry["chunks"])
            offsets = data[:4 * chunks].copy().view("<u4")
            flat = huffman_decode(data[4 * chunks:], offsets, np.asarray(entry["lengths"]), count,
                                  int(entry["chunk"]))
        else:
            raise ArtifactError(f"corrupt artifact {folder}: parameter '{name}' has unknown "
                                f"coding {codec!r} (known: bitpack, huffman)")
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"corrupt artifact {folder}: cannot decode parameter '{name}' "
                            f"({codec}): {e}") from e
    return flat.reshape(shape)


def _read_blob(z, manifest: dict, folder: Path) -> list[np.ndarray]:
    """Version 2: every parameter is a byte range of the one ``blob`` array."""
    blob = z["blob"]
    coding = manifest.get("param_coding", {})
    params = []
    for i, (name, (offset, nbytes, dtype, shape)) in enumerate(
            zip(manifest["params"], manifest["param_layout"], strict=True)):
        if offset < 0 or offset + nbytes > blob.size:
            raise ValueError(f"parameter '{name}' lies outside the stored bytes")
        data = blob[offset:offset + nbytes]
        if str(i) in coding:
            params.append(_decode_param(data, coding[str(i)], folder, name))
        else:
            params.append(data.copy().view(np.dtype(dtype).newbyteorder("<")).astype(dtype)
                          .reshape(shape))
    return params

def _export_library(model: CompiledModel, dest: Path) -> None:
    if model._library_path is not None:  # loaded from an artifact: the library is a file
        shutil.copyfile(model._library_path, dest)
        return
    from slimfx.lowering.targets import resolve_target
    from slimfx.lowering.toolchain import fcompile_for

    info = resolve_target(model.target)
    fcompile = fcompile_for(info)
    # "-s": no static symbol table or debug sections (about half the library); the
    # runtime finds its functions through the dynamic symbol table, which stays
    if fcompile is None:
        model._executable.export_library(str(dest), options=["-s"])
    else:
        model._executable.export_library(str(dest), fcompile=fcompile, options=["-s"])


def save(model: CompiledModel, path, *, index_coding: str = "bitpack") -> str:
    """Write ``model`` to the folder ``path`` (created; existing artifact files replaced).

    ``index_coding`` stores ``uint8`` parameters (codebook indices) compactly:
    ``"bitpack"`` (default; as many bits as the largest value needs), ``"huffman"``
    (entropy-coded, decoded at load), or ``"none"`` (one byte each, format version 1).
    """
    if index_coding not in ("bitpack", "huffman", "none"):
        raise ArtifactError(f"index_coding must be 'bitpack', 'huffman' or 'none', "
                            f"got {index_coding!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _export_library(model, folder / LIBRARY)
    names = model.param_names
    stored, coding = [], {}
    for i, p in enumerate(model._params):
        encoded = encode_indices(p, index_coding)
        if encoded is not None:
            coding[str(i)] = encoded[1]
        stored.append(p if encoded is None else encoded[0])
    manifest = dict(model.manifest)
    for key in ("param_coding", "param_layout"):
        manifest.pop(key, None)
    manifest["format"] = FORMAT
    if coding:  # version 2: one byte array, each parameter a range of it (no per-array headers)
        layout, offset = [], 0
        for p in stored:
            layout.append([offset, int(p.nbytes), p.dtype.name, list(p.shape)])
            offset += p.nbytes
        blob = np.concatenate([np.ascontiguousarray(p).astype(p.dtype.newbyteorder("<"))
                               .reshape(-1).view(np.uint8) for p in stored] or [np.zeros(0, np.uint8)])
        np.savez(folder / PARAMS, blob=blob)
        manifest["format_version"] = FORMAT_VERSION
        manifest["param_coding"], manifest["param_layout"] = coding, layout
    else:  # the oldest format that describes the content, so older readers load it
        np.savez(folder / PARAMS, **{f"p{i}": p for i, p in enumerate(stored)})
        manifest["format_version"] = 1
    manifest["params"] = names
    files = [LIBRARY, PARAMS]
    manifest.pop("device_code", None)
    if model._device_code:  # CUDA kernels compiled ahead for a library that holds their source
        manifest["device_code"] = {}
        for digest, binary in sorted(model._device_code.items()):
            name = f"cuda-{digest[:16]}.bin"
            (folder / name).write_bytes(binary)
            manifest["device_code"][digest] = name
            files.append(name)
    manifest["files"] = {name: _sha256(folder / name) for name in files}
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
    if version not in READS:
        raise ArtifactError(f"artifact {folder} has format version {version}; this slimfx reads "
                            f"versions {', '.join(map(str, READS))}: rebuild it with this slimfx")
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
            if manifest["format_version"] >= 2:
                params = _read_blob(z, manifest, folder)
            else:
                params = [z[f"p{i}"] for i in range(len(manifest["params"]))]
    except (KeyError, ValueError, OSError) as e:
        raise ArtifactError(f"corrupt artifact {folder}: cannot read {PARAMS}: {e}") from e
    shapes = manifest.get("param_shapes")
    if shapes is not None:
        for name, p, shape in zip(manifest["params"], params, shapes):
            if list(p.shape) != list(shape):
                raise ArtifactError(f"corrupt artifact {folder}: parameter '{name}' has shape "
                                    f"{list(p.shape)}, the manifest says {shape}")
    device_code = {digest: (folder / name).read_bytes()
                   for digest, name in manifest.get("device_code", {}).items()}
    lib_path = str(folder / LIBRARY)
    if remote is not None:
        remote.upload(lib_path)
        lib = remote.load_module(LIBRARY)
        return CompiledModel(lib, params, manifest, device=remote.cpu(), library_path=lib_path)
    from slimfx.lowering.targets import TargetInfo

    info = TargetInfo.from_config(manifest["target"])
    if info.local_device() is None:
        raise ArtifactError(f"artifact {folder} cannot run on this machine: "
                            f"{info.why_not_here()}; load it with remote=<RPC session> to run "
                            "it on the device")
    if device_code:
        from .devices import provide_cuda_binaries

        provide_cuda_binaries(device_code)  # TVM asks for them while loading the library
    try:
        lib = tvm.runtime.load_module(lib_path)
    except Exception as e:  # TVM raises its own error types
        raise ArtifactError(f"cannot load {lib_path}: {e}") from e
    return CompiledModel(lib, params, manifest, library_path=lib_path, device_code=device_code)
