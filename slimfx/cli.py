"""The ``slimfx`` command line: the same API as Python, for a model given as MODULE:FACTORY.

    slimfx inspect slimfx.zoo:resnet18 --input-shape 1,3,224,224 --pipeline "fold-bn,dce"
    slimfx compile slimfx.zoo:resnet18 --input-shape 1,3,224,224 --target host -o out/
    slimfx run out/ --bench
    slimfx passes

MODULE is an importable module name or a path to a ``.py`` file; FACTORY is a callable
returning an ``nn.Module`` (or an ``nn.Module`` instance).  Importing MODULE also
registers any passes it defines; ``--load`` imports more such modules.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from slimfx.errors import SlimfxError

__all__ = ["main", "load_factory", "parse_input_spec"]

_DTYPES = {"float32": torch.float32, "f32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64,
           "i64": torch.int64, "int32": torch.int32, "i32": torch.int32, "bool": torch.bool}


class CliError(SlimfxError):
    """A bad command-line argument."""


def _import_module(name: str):
    if name.endswith(".py") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise CliError(f"no such file: {name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise CliError(f"cannot import module '{name}': {e}") from e


def load_factory(ref: str) -> torch.nn.Module:
    """Build the model named by ``MODULE:FACTORY``."""
    if ":" not in ref:
        raise CliError(f"model must be MODULE:FACTORY (e.g. slimfx.zoo:resnet18), got '{ref}'")
    mod_name, _, attr = ref.rpartition(":")
    module = _import_module(mod_name)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise CliError(f"module '{mod_name}' has no attribute '{attr}'") from None
    model = obj if isinstance(obj, torch.nn.Module) else obj() if callable(obj) else None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"'{ref}' must be an nn.Module or a callable returning one, "
                       f"got {type(model).__name__}")
    return model


def parse_input_spec(text: str, seed: int = 0) -> torch.Tensor:
    """``"1,3,224,224"`` or ``"1,16:int64"`` -> a random example tensor.

    Floating inputs are standard normal; integer inputs are drawn from [0, 2); bool are
    all true.
    """
    shape_text, _, dtype_text = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.split(",") if s.strip())
    except ValueError:
        raise CliError(f"bad --input-shape '{text}': expected comma-separated integers, "
                       "optionally followed by :dtype (e.g. 1,16:int64)") from None
    if not shape or any(s <= 0 for s in shape):
        raise CliError(f"bad --input-shape '{text}': dimensions must be positive")
    dtype = _DTYPES.get(dtype_text or "float32")
    if dtype is None:
        raise CliError(f"bad dtype '{dtype_text}' in --input-shape; known: {', '.join(_DTYPES)}")
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randint(0, 2, shape, generator=gen, dtype=dtype)


def _model_and_inputs(args) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Import --load modules, build MODULE:FACTORY, and make the --input-shape tensors."""
    for mod in args.load or ():
        _import_module(mod)
    model = load_factory(args.model)
    if not args.input_shape:
        raise CliError("give at least one --input-shape (e.g. --input-shape 1,3,224,224)")
    return model, tuple(parse_input_spec(s, seed=i) for i, s in enumerate(args.input_shape))


def _cmd_inspect(args) -> int:
    import slimfx
    from slimfx.ir import draw, format_graph, layer_table
    from slimfx.passes import DumpIR, PassManager, PrintAfterChange, Statistics, Timing

    model, inputs = _model_and_inputs(args)
    graph = slimfx.capture(model, inputs)
    out = sys.stdout
    final = graph
    if args.pipeline:
        instruments = []
        if args.timing:
            instruments.append(Timing(file=out))
        if args.stats:
            instruments.append(Statistics(file=out))
        if args.print_after_change:
            instruments.append(PrintAfterChange(file=out))
        if args.dump_ir:
            instruments.append(DumpIR(args.dump_ir))
        final = PassManager(args.pipeline, instruments=instruments).run(graph)
    if args.ir:
        print(format_graph(final), file=out)
    print(layer_table(final, all_nodes=args.all), file=out)
    if args.pipeline:
        print(f"\n== what '{args.pipeline}' changed ==", file=out)
        print(slimfx.diff(graph, final), file=out)
    if args.channels:
        from slimfx.ir.channels import ChannelAnalysis

        print("\n== channel groups (what prunes together, and why) ==", file=out)
        print(ChannelAnalysis(final).summary(), file=out)
    for path in args.draw or ():
        draw.save(final, path)
        print(f"wrote {path}", file=out)
    return 0


def _cmd_compile(args) -> int:
    import slimfx

    model, inputs = _model_and_inputs(args)
    compiled = slimfx.compile(model, inputs, target=args.target, pipeline=args.pipeline,
                              tune=args.tune, records=args.records,
                              pad_channels=not args.no_pad_channels,
                              exec_mode=args.exec_mode)
    path = compiled.save(args.output)
    m = compiled.manifest
    print(f"built {m['name']} for {m['target_name']} ({m['target'].get('mtriple', m['target']['kind'])}, "
          f"mcpu={m['target'].get('mcpu', '-')}) in {m['build']['build_s']:.1f} s")
    if compiled.parity:
        print(f"parity vs PyTorch: max abs error {compiled.parity['max_abs_error']:.3g} "
              f"(tolerance {compiled.parity['tolerance']:.3g})")
    else:
        print("parity: not checked (this machine cannot run the target; use `slimfx run --remote`)")
    print(f"wrote {path}")
    return 0


def _cmd_run(args) -> int:
    import numpy as np

    from slimfx.runtime import load

    remote = None
    if args.remote:
        from slimfx.runtime.rpc import connect

        host, _, port = args.remote.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--remote must be HOST:PORT, got '{args.remote}'")
        remote = connect(host, int(port))
    compiled = load(args.artifact, remote=remote)
    rng = np.random.default_rng(args.seed)
    inputs = [rng.standard_normal(s.shape).astype(s.dtype) if s.dtype.startswith("float")
              else np.zeros(s.shape, dtype=s.dtype) for s in compiled.inputs]
    outs = compiled.run_numpy(*inputs)
    for spec, o in zip(compiled.outputs, outs):
        print(f"{spec.name}: {o.dtype}[{','.join(map(str, o.shape))}] "
              f"mean {float(o.mean()):.4g} max |x| {float(abs(o).max()):.4g}")
    if args.cold and not (args.bench or args.profile):
        raise CliError("--cold times --bench or --profile runs with the caches flushed: "
                       "add --bench or --profile N")
    if args.bench:
        if args.cold and remote is not None:
            raise CliError("--cold flushes this machine's caches; it cannot run with --remote")
        lat = compiled.benchmark(*inputs, repeat=args.repeat, cold=args.cold)
        print(f"latency{' (cold)' if args.cold else ''}: {lat}")
    if args.profile:
        if remote is not None:
            raise CliError("--profile times kernels on this machine; it cannot run with --remote")
        print(compiled.profile(*inputs, repeat=args.repeat, cold=args.cold).table(top=args.profile))
    return 0


def _cmd_passes(args) -> int:
    from slimfx.passes import list_passes
    from slimfx.passes.base import options_help

    for mod in args.load or ():
        _import_module(mod)
    for name, cls in list_passes().items():
        # the docstring's first paragraph, on one line
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        kind = "lossless" if cls.lossless else "lossy"
        if cls.lossless and cls.lossy_when:
            kind += f"; lossy with {cls.lossy_when}"
        print(f"{name}  ({kind}){'  - ' + summary if summary else ''}")
        for opt, tp, default in options_help(cls):
            print(f"    {opt}: {tp} = {default!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import slimfx

    parser = argparse.ArgumentParser(prog="slimfx", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"slimfx {slimfx.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="capture a model, optionally run a pipeline, print tables")
    p.add_argument("model", help="MODULE:FACTORY, e.g. slimfx.zoo:resnet18 or path/to/file.py:build")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="one per model input, e.g. 1,3,224,224 or 1,16:int64 (repeatable)")
    p.add_argument("--pipeline", help='passes to run, e.g. "fold-bn,dce"')
    p.add_argument("--load", action="append", metavar="MODULE",
                   help="import a module that registers custom passes (repeatable)")
    p.add_argument("--all", action="store_true", help="list every op, not only layers")
    p.add_argument("--ir", action="store_true", help="print the (final) IR")
    p.add_argument("--timing", action="store_true", help="print per-pass timing")
    p.add_argument("--stats", action="store_true", help="print per-pass statistics")
    p.add_argument("--print-after-change", action="store_true",
                   help="print the IR and the diff after each pass that changed the graph")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass into DIR")
    p.add_argument("--channels", action="store_true",
                   help="print the channel-dependency groups (what prune-channels couples)")
    p.add_argument("--draw", action="append", metavar="FILE",
                   help="draw the final graph to FILE.dot or FILE.svg (repeatable)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("compile", help="capture, run a pipeline, build for a target, save")
    p.add_argument("model", help="MODULE:FACTORY, e.g. slimfx.zoo:resnet18")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="one per model input (repeatable)")
    p.add_argument("--pipeline", help='passes to run before lowering, e.g. "fold-bn,dce"')
    p.add_argument("--target", default="host",
                   help="host (default), x86-64-avx2, x86-64-avx512, aarch64, aarch64-cortex-a55, cuda")
    p.add_argument("-o", "--output", required=True, help="artifact folder to write")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="MetaSchedule trial budget (default 0: hand schedules); needs --records")
    p.add_argument("--records", metavar="DIR",
                   help="tuning records folder: reused, and written to when tuning")
    p.add_argument("--no-pad-channels", action="store_true",
                   help="keep channel widths as they are (no automatic pad-channels)")
    p.add_argument("--exec-mode", choices=["bytecode", "compiled"], default="bytecode",
                   help="VM kernel sequence interpreted (default; `run --profile` works) or "
                        "compiled to machine code (less overhead on small models)")
    p.add_argument("--load", action="append", metavar="MODULE",
                   help="import a module that registers custom passes (repeatable)")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run", help="load an artifact and run it (optionally benchmark)")
    p.add_argument("artifact", help="artifact folder written by `slimfx compile`")
    p.add_argument("--bench", action="store_true", help="print latency median/min/max")
    p.add_argument("--cold", action="store_true",
                   help="with --bench or --profile: flush the CPU caches before each run "
                        "(weights from memory)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs for --bench/--profile (default 20)")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="print the N slowest kernels (per-kernel times over --repeat runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--remote", metavar="HOST:PORT", help="run on a TVM RPC server")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("passes", help="list registered passes and their options")
    p.add_argument("--load", action="append", metavar="MODULE",
                   help="import a module that registers custom passes (repeatable)")
    p.set_defaults(func=_cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SlimfxError as e:
        print(f"slimfx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
