"""``ditperf export {onnx,check,surgery,coverage,engine}`` (imports stay lazy: stdlib here)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ditperf.cli.argtypes import positive_float

EXPORT_HELP = """\
ONNX export of ditperf DiT presets, graph surgery for TensorRT, per-operator TensorRT coverage
and TensorRT engine builds.

  ditperf export onnx --preset tiny --out tiny.onnx            # export + onnxruntime check
  ditperf export check tiny.onnx                               # re-check a file
  ditperf export surgery tiny.onnx tiny.opt.onnx --opset 23    # fold LN/attention, clean up
  ditperf export coverage tiny.onnx --json cov.json            # which ops TensorRT takes
  ditperf export engine tiny.onnx --out tiny.plan              # GPU + TensorRT only"""


def _user_error(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the export package's bad-input errors to the CLI's one-line UserError."""

    def wrapped(args: argparse.Namespace) -> int:
        from ditperf.cli.errors import UserError
        from ditperf.export.engine import TensorRTUnavailable
        from ditperf.export.onnx_io import OnnxInputError

        try:
            return fn(args)
        except OnnxInputError as exc:
            raise UserError(str(exc)) from exc
        except TensorRTUnavailable as exc:
            raise UserError(str(exc), exit_code=3) from exc

    return wrapped


def _positive(text: str) -> int:
    value = _batch(text)
    if value == "dynamic":
        raise argparse.ArgumentTypeError("expected a positive integer, got 'dynamic'")
    return int(value)


def _batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'dynamic', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_out(path: str | None, what: str) -> None:
    """Refuse an output path that cannot be written, before any work: a folder, or a parent
    that is a file (an export of a large model would otherwise fail only at the end)."""
    from ditperf.export.onnx_io import OnnxInputError

    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise OnnxInputError(f"{what} {path} is a folder; give a file path")
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OnnxInputError(f"{what} {path}: {parent} is a file, not a folder")


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"wrote {path}")


def _wrap(text: str) -> str:
    """One-paragraph help text wrapped for the raw formatter."""
    import textwrap

    return textwrap.fill(" ".join(text.split()), width=92)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- onnx ------------------------------------------------------------------------------------


def _print_check(check: dict) -> None:
    verdict = "OK" if check["ok"] else "FAILED"
    print(f"numeric check ({check['reference']} vs onnxruntime CPU, batch {check['batch']}): "
          f"max abs {check['max_abs']:.3g}, max rel {check['max_rel']:.3g} "
          f"(of max |ref| {check['ref_max']:.3g}; tolerance {check['tolerance_rel']:g}) {verdict}")


def _run_onnx(args: argparse.Namespace) -> int:
    from ditperf.export.onnx_export import ExportSpec, export_onnx

    _check_out(args.out, "--out")
    _check_out(args.json, "--json")
    ext = {"auto": None, "yes": True, "no": False}[args.external_data]
    spec = ExportSpec(preset=args.preset, out=args.out, ckpt=args.ckpt, height=args.height,
                      width=args.width, text_len=args.text_len, batch=args.batch,
                      opset=args.opset, dtype=args.dtype, backend=args.backend,
                      attention=args.attention, seed=args.seed, external_data=ext,
                      check=False if args.no_check else None)
    res = export_onnx(spec, log=_log)
    mb = res.bytes / 2**20
    print(f"wrote {res.path}" + (f" + {res.data_path}" if res.data_path else "") +
          f" ({mb:.1f} MiB, {res.params / 1e6:.2f}M params, opset {res.opset}, "
          f"{res.nodes} nodes, {res.seconds:.1f} s)")
    top = sorted(res.ops.items(), key=lambda kv: -kv[1])[:12]
    print("ops: " + ", ".join(f"{k} {v}" for k, v in top) +
          (f", ... ({len(res.ops)} op types)" if len(res.ops) > 12 else ""))
    for note in res.notes:
        print(f"note: {note}")
    if res.check:
        _print_check(res.check)
    _write_json(args.json, res.to_dict())
    return 0 if (res.check is None or res.check["ok"]) else 1


# -- check -----------------------------------------------------------------------------------


def _run_check(args: argparse.Namespace) -> int:
    from ditperf.export.onnx_export import check_file

    _check_out(args.json, "--json")
    res = check_file(args.model, preset=args.preset, ckpt=args.ckpt, backend=args.backend,
                     batch=args.batch, log=_log)
    _print_check(res)
    _write_json(args.json, res)
    return 0 if res["ok"] else 1


# -- surgery ---------------------------------------------------------------------------------


def _cast_around(specs: list[str]) -> list[tuple[str, int]]:
    from ditperf.export.onnx_io import OnnxInputError
    from onnx import TensorProto

    types = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16,
             "fp64": TensorProto.DOUBLE}
    out = []
    for s in specs:
        op, _, t = s.partition(":")
        if not op or t.lower() not in types:
            raise OnnxInputError(f"--cast-around {s!r}: expected OP:TYPE with TYPE in "
                                 f"{', '.join(types)} (e.g. Resize:bf16)")
        out.append((op, types[t.lower()]))
    return out


def _run_surgery(args: argparse.Namespace) -> int:
    from ditperf.export.check import tolerance_for
    from ditperf.export.onnx_io import (
        OnnxInputError,
        external_data_files,
        load_model,
        model_nbytes,
        save_model,
    )
    from ditperf.export.surgery import (
        DEFAULT_PASSES,
        PluginSpec,
        SurgeryOptions,
        check_model,
        run_passes,
        verify_numerics,
    )

    _check_out(args.output, "output")
    _check_out(args.json, "--json")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise OnnxInputError(f"output {args.output} is the input: write the result to another file "
                             "(the numeric check compares the two)")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes \
        else list(DEFAULT_PASSES)
    opts = SurgeryOptions(opset=args.opset,
                          plugins=[PluginSpec.parse(s) for s in args.plugin_op],
                          cast_around=_cast_around(args.cast_around) if args.cast_around else None)
    light = load_model(args.input, load_external_data=False)
    had_external = bool(external_data_files(light))
    model = load_model(args.input)
    _log(f"running {', '.join(passes)} on {args.input} ({len(model.graph.node)} nodes) ...")
    new, reports = run_passes(model, passes, opts)
    for rep in reports:
        print(rep.line())
    try:
        check_model(new)
        print("onnx.checker: OK")
    except Exception as exc:
        raise OnnxInputError(f"the result fails onnx.checker: {str(exc).splitlines()[0]}") \
            from exc
    big = model_nbytes(model) > 2**31
    n_nodes = len(new.graph.node)
    opset = next(i.version for i in new.opset_import if i.domain in ("", "ai.onnx"))
    del model
    path = save_model(new, args.output, external_data=True if had_external or big else None,
                      keep_in_memory=False)
    del new
    verify = None
    failed_verify = False
    if args.no_verify or (big and not args.verify):
        if big and not args.no_verify:
            print("onnxruntime check skipped: the model is over 2 GiB (onnxruntime would hold "
                  "both copies); pass --verify to force it")
    else:
        try:
            verify = verify_numerics(args.input, path)
            print(f"onnxruntime check (random inputs): max abs diff {verify['max_abs']:.3g}, "
                  f"max rel {verify['max_rel']:.3g}")
            for name, out in verify["outputs"].items():
                tol = args.tolerance if args.tolerance is not None else tolerance_for(out["dtype"])
                out["tolerance"] = tol
                if out["max_rel"] != out["max_rel"]:  # NaN: non-finite values differ
                    print(f"error: output {name} of the rewritten graph differs in non-finite values ({out['note']})")
                    failed_verify = True
                elif out["max_rel"] > tol:
                    print(f"error: output {name} of the rewritten graph differs by max rel {out['max_rel']:.3g} "
                          f"> {tol:g} ({out['dtype']}; --tolerance to accept more)")
                    failed_verify = True
        except OnnxInputError as exc:
            print(f"onnxruntime check skipped: {exc}")
    print(f"wrote {path} ({n_nodes} nodes, opset {opset})")
    _write_json(args.json, {"schema": "ditperf.surgery/1", "input": args.input,
                            "output": str(path), "passes": [r.to_dict() for r in reports],
                            "verify": verify})
    return 1 if failed_verify else 0


# -- coverage --------------------------------------------------------------------------------


def _run_coverage(args: argparse.Namespace) -> int:
    from ditperf.export.coverage import coverage, render

    _check_out(args.json, "--json")
    report = coverage(args.model, trt_version=args.trt_version)
    if not args.quiet:
        render(report)
    _write_json(args.json, report)
    return 0 if report["summary"]["fully_supported"] else 1


# -- engine ----------------------------------------------------------------------------------


def _run_engine(args: argparse.Namespace) -> int:
    from ditperf.export.engine import build_engine, import_tensorrt, time_against_torch

    import_tensorrt()  # one clear line when TensorRT or the GPU is missing
    res = build_engine(args.model, args.out, fp16=args.fp16, bf16=args.bf16,
                       strongly_typed=args.strongly_typed, workspace_gib=args.workspace,
                       log=_log)
    print(f"wrote {res.plan} ({res.plan_bytes / 2**20:.1f} MiB, TensorRT {res.trt_version}, "
          f"{res.precision}, built in {res.build_s:.1f} s)")
    if not args.no_timing:
        timings, err = time_against_torch(args.model, args.out, batch=args.batch,
                                          compile_torch=not args.no_compile, log=_log)
        res.timings_ms, res.max_rel_error = timings, err
        base = timings.get("tensorrt")
        for name, ms in timings.items():
            speed = f"  ({ms / base:.2f}x TensorRT's time)" if base and name != "tensorrt" else ""
            print(f"{name:>28}: {ms:8.3f} ms{speed}")
        print(f"TensorRT vs eager output: max rel error {err:.3g}")
    _write_json(args.json, res.to_dict())
    return 0


# -- registration ----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("export", help="ONNX export, graph surgery, TensorRT coverage and engines",
                       description=EXPORT_HELP, formatter_class=fmt)
    esub = p.add_subparsers(dest="export_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    o = esub.add_parser(
        "onnx", formatter_class=fmt, help="export a preset to ONNX (+ onnxruntime check)",
        description=_wrap("Export a DiT preset with torch.onnx.export(dynamo=True). The Triton "
        "backend's custom ops map to LayerNormalization + Mul/Add (adaLN), MatMul/Softmax/"
        "MatMul attention (opset < 23) or ONNX Attention/RMSNormalization (opset 23). Opset 17 "
        "is exported at 18 and lowered exactly. Without --ckpt the weights are random (seeded; "
        "zero-initialized layers perturbed so the output is not 0). Weights above 2 GB go to "
        "<out>.data. The onnxruntime check runs by default when the model fits in memory."))
    o.add_argument("--preset", required=True, help="model preset (tiny, dit-xl-2, t2i-1b, ...)")
    o.add_argument("--out", required=True, help="output .onnx path")
    o.add_argument("--ckpt", help="checkpoint: state_dict or Composer checkpoint (.pt)")
    o.add_argument("--height", type=int, help="latent height (default: the preset's)")
    o.add_argument("--width", type=int, help="latent width (default: the preset's)")
    o.add_argument("--text-len", type=int, help="text tokens (text presets; default: preset's)")
    o.add_argument("--batch", type=_batch, default=1, help="batch size or 'dynamic' (default 1)")
    o.add_argument("--opset", type=int, default=18, choices=[17, 18, 20, 23],
                   help="ONNX opset (default 18; 23 adds Attention and RMSNormalization)")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights and activations dtype (default fp32)")
    o.add_argument("--backend", default="triton", choices=["torch", "triton"],
                   help="model backend traced (default triton: the ditperf custom ops)")
    o.add_argument("--attention", default="auto", choices=["auto", "matmul", "onnx"],
                   help="attention form: auto = ONNX Attention at opset 23, else MatMul/Softmax")
    o.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    o.add_argument("--external-data", default="auto", choices=["auto", "yes", "no"],
                   help="weights in <out>.data: auto = only above 2 GB")
    o.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    o.add_argument("--json", help="write the export report as JSON")
    o.set_defaults(func=_user_error(_run_onnx))

    c = esub.add_parser(
        "check", formatter_class=fmt, help="onnxruntime vs PyTorch on random inputs",
        description=_wrap("Rebuild the PyTorch model the file was exported from (from the ditperf "
        "metadata in the file, or --preset/--ckpt) and compare onnxruntime (CPU) with it on "
        "random inputs. Prints max abs / rel error; exit 1 above the dtype's tolerance."))
    c.add_argument("model", help="an .onnx file")
    c.add_argument("--preset", help="override the preset recorded in the file")
    c.add_argument("--ckpt", help="checkpoint with the weights the file was exported from")
    c.add_argument("--backend", choices=["torch", "triton"], help="PyTorch backend to compare")
    c.add_argument("--batch", type=_positive, help="batch to run (dynamic-batch files: any)")
    c.add_argument("--json", help="write the result as JSON")
    c.set_defaults(func=_user_error(_run_check))

    s = esub.add_parser(
        "surgery", formatter_class=fmt, help="graph surgery for TensorRT (onnx-graphsurgeon)",
        description="Passes (comma-separated, in order; default: fold-constants, cast-chains, "
        "fold-layernorm, fold-attention, cast-around, cleanup):\n"
        "  fold-constants  shape inference + constant folding\n"
        "  cleanup         dead nodes/outputs removed, topological sort\n"
        "  cast-chains     Cast->Cast through a lossless type collapsed, identity Casts removed\n"
        "  fold-layernorm  ReduceMean/Sub/Pow/.../Div(+Mul/Add) -> LayerNormalization (opset>=17)\n"
        "  fold-attention  MatMul/(scale)/(+mask)/Softmax/MatMul -> Attention (opset>=23)\n"
        "  cast-around     fp32 Casts around ops a precision lacks (default: BF16 Resize, ...)\n"
        "  plugin          nodes -> custom-domain plugin nodes (with --plugin-op)\n"
        "Each pass prints what it changed; the result is checked with onnx.checker and, while "
        "it stays in standard ops, against the input with onnxruntime.")
    s.add_argument("input", help="input .onnx")
    s.add_argument("output", help="output .onnx")
    s.add_argument("--passes", help="comma-separated passes (default: all but plugin)")
    s.add_argument("--opset", type=int, help="convert to this opset first (e.g. 23 to allow "
                   "fold-attention, 17 for fold-layernorm on older models)")
    s.add_argument("--plugin-op", action="append", default=[], metavar="SPEC",
                   help="OP[:DOMAIN] retargets every OP node to DOMAIN (default "
                   "ditperf.plugins); NAME=IN1,IN2->OUT1[@DOMAIN] replaces the subgraph between "
                   "those tensors by one NAME node. Repeatable.")
    s.add_argument("--cast-around", action="append", default=[], metavar="OP:TYPE",
                   help="compute OP in fp32 when its tensors are TYPE (bf16, fp16, fp64); "
                   "repeatable; default: from the TensorRT matrix + BF16 Resize")
    ver = s.add_mutually_exclusive_group()
    ver.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ver.add_argument("--verify", action="store_true",
                     help="compare with onnxruntime even above 2 GiB (skipped there by default)")
    s.add_argument("--tolerance", type=positive_float, metavar="REL",
                   help="largest max-abs-diff / max|output| accepted per output (default by dtype: "
                        "fp32 1e-4, fp16 2e-2, bf16 6e-2); exit 1 above it")
    s.add_argument("--json", help="write the pass reports as JSON")
    s.set_defaults(func=_user_error(_run_surgery))

    v = esub.add_parser(
        "coverage", formatter_class=fmt, help="per-operator TensorRT support report",
        description=_wrap(
            "Per ONNX op type: count, supported, types used vs supported, restrictions, "
            "unsupported node ranges and names, and which source decided. Offline from the "
            "shipped onnx-tensorrt 10.1 matrix (+ later documented additions: pass e.g. "
            "--trt-version 10.15); live from TensorRT's parser (supports_model_v2) when TensorRT "
            "and a GPU are present. JSON schema ditperf.coverage/1 (see "
            "ditperf.export.coverage). Exit 0 when fully supported, 1 otherwise."))
    v.add_argument("model", help="an .onnx file")
    v.add_argument("--trt-version", default="auto",
                   help="auto (live if possible, else 10.1), live, or a version like 10.1, 10.15")
    v.add_argument("--json", help="write the report as JSON")
    v.add_argument("--quiet", action="store_true", help="no table (JSON/exit code only)")
    v.set_defaults(func=_user_error(_run_coverage))

    e = esub.add_parser(
        "engine", formatter_class=fmt, help="build a TensorRT engine and time it vs PyTorch",
        description=_wrap("Build a TensorRT engine (needs the `trt` extra and a GPU), then time it "
        "against the PyTorch model (eager and torch.compile) on the same inputs. --fp16/--bf16 "
        "are TensorRT 10 weak-typing flags; with TensorRT 11 export with --dtype fp16|bf16 and "
        "use --strongly-typed."))
    e.add_argument("model", help="an .onnx file written by `ditperf export onnx`")
    e.add_argument("--out", required=True, help="engine (.plan) path")
    prec = e.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="allow FP16 kernels (TensorRT 10)")
    prec.add_argument("--bf16", action="store_true", help="allow BF16 kernels (TensorRT 10)")
    prec.add_argument("--strongly-typed", action="store_true",
                      help="use exactly the ONNX types (TensorRT >= 10.12 / 11)")
    e.add_argument("--workspace", type=float, default=8.0, help="workspace GiB (default 8)")
    e.add_argument("--batch", type=int, help="batch for timing (default: the exported one)")
    e.add_argument("--no-timing", action="store_true", help="build only")
    e.add_argument("--no-compile", action="store_true", help="skip torch.compile timing")
    e.add_argument("--json", help="write build + timing results as JSON")
    e.set_defaults(func=_user_error(_run_engine))
