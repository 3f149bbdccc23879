"""``ditperf data ...`` and ``ditperf train ...`` (module-level imports: stdlib only)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ditperf.cli.errors import UserError

DATA_HELP = """\
Latent datasets in MosaicML Streaming (MDS) shards, one MDS folder per aspect-ratio bucket,
described by DIR/ditperf_schema.json (conditioning, latent channels, text shape, buckets).

  ditperf data synth --out DIR --preset tiny --num 256        synthetic latents (+ text)
  ditperf data encode IMAGES_DIR --out DIR --vae ... --text-encoder ...   real images
  ditperf data verify DIR                                     check files and hashes
"""

SYNTH_HELP = """\
Write NUM synthetic samples with the schema a model preset trains on: latents of the preset's
channels (a smooth per-concept pattern plus noise, unit scale like scaled VAE latents, so the
loss can go down), labels, and for text presets text embeddings (L x D of the preset) with a
padding mask. For benchmarks, tests and the demo. --buckets takes LATENT sizes (HxW in latent
pixels); samples are spread round-robin over them."""

ENCODE_HELP = """\
Encode images (+ captions) into latents with a diffusers AutoencoderKL and a transformers text
encoder, and write MDS shards (zstd, xxh64 hashes).

Input: a folder of *.jpg/*.jpeg/*.png/*.webp (recursively), each with an optional same-stem
*.txt caption (class subfolders give labels with --labels folders), or a JSONL file with one
{"path": ..., "caption": ..., "label": ...} per line (relative paths are relative to the file).

Each image goes to the aspect-ratio bucket (--buckets, IMAGE sizes HxW in pixels; default: 5
buckets of about --resolution^2 pixels) closest in log aspect ratio, is resized to cover it
and center-cropped. latent = (posterior mean - shift_factor) * scaling_factor of the VAE
config (--latent sample draws from the posterior, seeded per image). Text: the tokenizer pads
or truncates to --max-length; the text encoder's last hidden state is stored in fp16 with
the attention mask.

Resumable: inputs are cut into chunks of --chunk-size in sorted order; chunk i is written to
OUT/<bucket>/part-<i> and marked done in OUT/_encode/; a rerun with the same arguments skips
done chunks and redoes unfinished ones. The bucket index.json files and the schema are written
at the end. --vae/--text-encoder accept a Hugging Face name or a local folder (e.g. one saved
with save_pretrained); use --vae-subfolder vae etc. for pipeline repositories."""

TRAIN_HELP = """\
Train a DiT with MosaicML Composer on a ditperf MDS dataset.

CONFIG is a YAML file or the name of a packaged config (tiny-cpu, dit-xl-2, t2i-1b).
Overrides are dotted key=value pairs (values parsed as YAML), e.g.:

  ditperf train tiny-cpu data.local=/tmp/tiny max_duration=8ba model.backend=triton
  ditperf train dit-xl-2 data.local=/data/in1k save_folder=ckpt save_interval=1000ba
  ditperf train dit-xl-2 ... autoresume=true run_name=xl     # resume from save_folder
  ditperf train dit-xl-2 ... load_path=ckpt/ep0-ba1000-rank0.pt

Several GPUs or nodes: Composer's launcher, `composer -n 8 -m ditperf.trainer CONFIG [k=v ...]`
(DDP; FSDP via parallelism_config in the config, fsdp_version=1|2). Checkpoints: Composer's own files
ep{epoch}-ba{batch}-rank{rank}.pt + latest-rank{rank}.pt. At the end a summary (loss, img/s
and MFU from Composer's SpeedMonitor) is printed and written to <save_folder>/train_summary.json.
`--list-keys` prints every key with its default."""


def _data_synth(args: argparse.Namespace) -> int:
    from ditperf.trainer import data as D

    try:
        from ditperf.model import get_config

        cfg = get_config(args.preset, **({"conditioning": args.conditioning} if args.conditioning else {}))
        schema = D.synth_dataset(args.out, cfg, args.num, buckets=D.parse_buckets(args.buckets) or None,
                                 seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _print_written(schema, args.out)
    return 0


def _print_written(schema, out) -> None:
    print(f"wrote {schema.total_samples} samples ({schema.conditioning}, {schema.latent_channels} channels, "
          f"buckets {', '.join(f'{b.name}:{b.samples}' for b in schema.buckets)}) to {out}")


def _data_encode(args: argparse.Namespace) -> int:
    from ditperf.trainer import encode as E

    try:
        opts = E.EncodeOptions(
            vae=args.vae, vae_subfolder=args.vae_subfolder, text_encoder=args.text_encoder,
            text_encoder_subfolder=args.text_encoder_subfolder, tokenizer=args.tokenizer,
            tokenizer_subfolder=args.tokenizer_subfolder, resolution=args.resolution,
            buckets=args.buckets, max_length=args.max_length, latent=args.latent, batch_size=args.batch_size,
            chunk_size=args.chunk_size, device=args.device, dtype=args.dtype, labels=args.labels,
            num_classes=args.num_classes, seed=args.seed, progress=not args.quiet, skip_bad=args.skip_bad,
        )
        schema = E.encode_dataset(args.input, args.out, opts)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    _print_written(schema, args.out)
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from ditperf.trainer import data as D

    try:
        schema = D.verify_dataset(args.dir, mode=args.mode)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    doc = schema.to_json()
    doc.pop("columns", None)
    if args.json:
        import json

        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.dir}: OK ({args.mode}) - {schema.total_samples} samples, {schema.conditioning}-conditioned, "
              f"{schema.latent_channels} latent channels"
              + (f", text {schema.text_len}x{schema.text_dim}" if schema.conditioning == "text" else "")
              + f"; buckets {', '.join(f'{b.name}:{b.samples}' for b in schema.buckets)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ditperf.trainer import config as C

    if args.list_keys:
        print(C.describe_keys())
        return 0
    if args.list_configs:
        print("\n".join(C.packaged_configs()))
        return 0
    if not args.config:
        raise UserError("give a CONFIG (a YAML path or one of: " + ", ".join(C.packaged_configs()) + ")")
    try:
        cfg = C.load_config(args.config, args.overrides)
    except C.ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=False))
        return 0
    return run_training(cfg)


def _worker_message(text: str) -> str:
    """A DataLoader worker's error re-raised in the main process carries the worker's whole
    traceback in its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."): keep the error's own last line."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return "(data loader worker) " + last.split("Error: ", 1)[-1]


def run_training(cfg: dict[str, Any]) -> int:
    from ditperf.trainer import config as C
    from ditperf.trainer import data as D
    from ditperf.trainer import train as T

    try:
        T.train(cfg)
    except (C.ConfigError, D.DataError) as exc:
        raise UserError(_worker_message(str(exc))) from None
    except T.TrainingStopped as exc:
        raise UserError(str(exc), exit_code=3) from None
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("data", help="make latent datasets (MDS shards): synth, encode, verify",
                       description=DATA_HELP, formatter_class=fmt)
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    s = dsub.add_parser("synth", help="synthetic latents (+ text embeddings) for a model preset",
                        description=SYNTH_HELP, formatter_class=fmt)
    s.add_argument("--out", required=True, help="output folder (must be empty or not exist)")
    s.add_argument("--preset", default="tiny", help="model preset whose schema to write (default: tiny)")
    s.add_argument("--num", type=int, required=True, help="number of samples")
    s.add_argument("--buckets", default=None, help="latent sizes HxW, comma-separated (default: the preset's)")
    s.add_argument("--conditioning", choices=("class", "text"), default=None,
                   help="override the preset's conditioning")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_data_synth)

    e = dsub.add_parser("encode", help="encode images + captions with a VAE and a text encoder",
                        description=ENCODE_HELP, formatter_class=fmt)
    e.add_argument("input", help="folder of images (+ same-stem .txt captions) or a .jsonl file")
    e.add_argument("--out", required=True, help="output dataset folder")
    e.add_argument("--vae", required=True, help="diffusers AutoencoderKL: HF name or local folder")
    e.add_argument("--vae-subfolder", default=None, help="e.g. vae for a pipeline repository")
    e.add_argument("--text-encoder", default=None,
                   help="transformers text encoder (CLIP/T5/...): HF name or folder; omit for a class dataset")
    e.add_argument("--text-encoder-subfolder", default=None)
    e.add_argument("--tokenizer", default=None, help="tokenizer name/folder (default: --text-encoder)")
    e.add_argument("--tokenizer-subfolder", default=None)
    e.add_argument("--resolution", type=int, default=256, help="target image side for the default buckets")
    e.add_argument("--buckets", default=None, help="IMAGE sizes HxW in pixels, comma-separated")
    e.add_argument("--max-length", type=int, default=None, help="text tokens (default: tokenizer max, <= 512)")
    e.add_argument("--latent", choices=("mean", "sample"), default="mean",
                   help="posterior mean (deterministic, default) or a seeded sample")
    e.add_argument("--labels", choices=("none", "folders", "jsonl"), default="none",
                   help="class labels from subfolder names or the JSONL 'label' field")
    e.add_argument("--num-classes", type=int, default=None, help="class count to record (default: inferred)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="encoder dtype (auto: bf16 on GPU, fp32 on CPU)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (listed in OUT/_encode/skipped.txt) instead of stopping")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_data_encode)

    v = dsub.add_parser("verify", help="check a dataset's files, columns and hashes",
                        description="Check that every shard listed by each bucket's index.json exists with its "
                                    "byte size and xxh64 hash, and that columns match ditperf_schema.json.")
    v.add_argument("dir")
    v.add_argument("--mode", choices=("hashes", "size", "none"), default="hashes")
    v.add_argument("--json", action="store_true", help="print the schema as JSON")
    v.set_defaults(func=_data_verify)

    t = sub.add_parser("train", help="train a DiT with Composer on MDS latents",
                       description=TRAIN_HELP, formatter_class=fmt)
    t.add_argument("config", nargs="?", help="YAML path or packaged config name")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    t.add_argument("--list-keys", action="store_true", help="print every config key with its default")
    t.add_argument("--list-configs", action="store_true", help="print the packaged config names")
    t.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    t.set_defaults(func=_train)


def main(argv: list[str] | None = None) -> int:
    """``python -m ditperf.trainer CONFIG [k=v ...]`` (what ``composer -n N -m`` runs)."""
    parser = argparse.ArgumentParser(prog="python -m ditperf.trainer", description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from ditperf.trainer import config as C

    try:
        cfg = C.load_config(args.config, args.overrides)
        return run_training(cfg)
    except C.ConfigError as exc:
        print(f"ditperf.trainer: error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"ditperf.trainer: error: {exc}", file=sys.stderr)
        return exc.exit_code
