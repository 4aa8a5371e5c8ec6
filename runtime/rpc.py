"""Running on a remote device through TVM RPC.

On the device (a board or phone with TVM's runtime), start TVM's RPC server, e.g.
``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090``.  Then, here::

    cm = slimfx.compile(model, x, target="aarch64")
    cm.save("out/")
    remote = slimfx.runtime.rpc.connect("192.168.1.20", 9090)   # the device's address
    dev_model = slimfx.runtime.load("out/", remote=remote)
    dev_model(x); dev_model.benchmark(x)                          # timed on the device

:func:`local_server` starts a server on this machine's loopback, for tests and for trying
the flow without a device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from slimfx.errors import SlimfxError

__all__ = ["connect", "local_server", "RPCError"]


class RPCError(SlimfxError):
    """An RPC server could not be reached or started."""


def connect(host: str, port: int, *, timeout_s: float = 60.0):
    """Connect to a TVM RPC server; returns the session (``tvm.rpc.RPCSession``)."""
    from tvm import rpc

    try:
        return rpc.connect(host, port, session_timeout=timeout_s)
    except Exception as e:  # TVM raises TVMError/ConnectionError
        raise RPCError(f"cannot connect to the RPC server at {host}:{port}: {e}") from e


@contextlib.contextmanager
def local_server(port: int = 9190, port_end: int = 9290) -> Iterator[tuple[str, int]]:
    """Run a TVM RPC server on 127.0.0.1 for the duration of a ``with`` block.

    Yields ``(host, port)``; the server process is stopped on exit.
    """
    from tvm import rpc

    try:
        server = rpc.Server(host="127.0.0.1", port=port, port_end=port_end, silent=True)
    except Exception as e:
        raise RPCError(f"cannot start an RPC server on 127.0.0.1:{port}-{port_end}: {e}") from e
    try:
        yield "127.0.0.1", server.port
    finally:
        server.terminate()
