"""``ditperf data encode``: images + captions -> VAE latents + text embeddings in MDS shards.

Pipeline per image: pick the aspect-ratio bucket closest in log aspect ratio, resize so the
image covers the bucket (bicubic) and center-crop, scale pixels to [-1, 1], encode with a
diffusers ``AutoencoderKL``: ``latent = (posterior.mean - shift_factor) * scaling_factor``
(``--latent sample``: ``mean + std * n`` with n seeded per image index), both factors read
from the VAE config (SD: scaling 0.18215, no shift; SD3/Flux VAEs also have a shift). Captions
are tokenized (padded / truncated to ``max_length``) and encoded by a transformers text encoder
(CLIP text, T5/UMT5 encoder, or ``AutoModel``); its last hidden state is stored in fp16 with
the attention mask (the first position is always marked real, so an empty caption still has
one key for cross-attention).

Resumability: the sorted inputs are cut into chunks of ``chunk_size``. Chunk ``i`` writes
``OUT/<bucket>/part-<i>.tmp`` (one MDS folder per bucket it touches), renames them to
``part-<i>`` and then writes ``OUT/_encode/chunk-<i>.json`` (the done marker, with per-bucket
counts). A rerun with the same inputs and options skips chunks that have a marker and rewrites
the others (their partial folders are removed first). ``OUT/_encode/plan.json`` records the
inputs' digest and the options: a rerun with different ones is refused instead of mixing two
encodings. At the end each bucket's ``index.json`` lists every part and the schema file is
written; until then the folder is not a dataset (readers refuse it), and nothing written by a
finished chunk is ever removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ditperf.trainer.data import (
    Bucket,
    DataError,
    DatasetSchema,
    make_sample,
    merge_parts,
    mix_seed,
    open_writer,
    parse_buckets,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
STATE_DIR = "_encode"
DEFAULT_RATIOS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)  # width / height


@dataclass
class EncodeOptions:
    vae: str
    text_encoder: str | None = None
    vae_subfolder: str | None = None
    text_encoder_subfolder: str | None = None
    tokenizer: str | None = None
    tokenizer_subfolder: str | None = None
    resolution: int = 256
    buckets: str | None = None  # image sizes "HxW,..." in pixels
    max_length: int | None = None
    latent: str = "mean"  # mean | sample
    batch_size: int = 16
    chunk_size: int = 1024
    device: str = "auto"
    dtype: str = "auto"
    labels: str = "none"  # none | folders | jsonl
    num_classes: int | None = None
    seed: int = 0
    progress: bool = True
    skip_bad: bool = False

    def plan_fields(self) -> dict[str, Any]:
        """Options that change the output (a resumed encode must use the same)."""
        d = asdict(self)
        for k in ("batch_size", "device", "progress", "skip_bad"):
            d.pop(k)
        return d


@dataclass
class Item:
    path: str
    caption: str
    label: int


# ----------------------------------------------------------------------------- inputs


def list_inputs(source: str | Path, labels: str = "none") -> tuple[list[Item], list[str] | None]:
    """Items sorted by path, and the class names when labels come from folders."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"input {source} does not exist")
    classes: list[str] | None = None
    items: list[Item] = []
    if source.is_file():
        if source.suffix != ".jsonl":
            raise DataError(f"input {source}: expected a folder of images or a .jsonl file")
        if labels == "folders":
            raise DataError("--labels folders needs a folder input (a JSONL file gives labels with --labels jsonl)")
        for n, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                path = Path(rec["path"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{source}:{n}: expected a JSON object with 'path' ({exc})") from None
            if not path.is_absolute():
                path = source.parent / path
            label = -1
            if labels == "jsonl":
                if "label" not in rec:
                    raise DataError(f"{source}:{n}: --labels jsonl but the record has no 'label'")
                try:
                    label = int(rec["label"])
                except (TypeError, ValueError):
                    raise DataError(f"{source}:{n}: 'label' must be a whole number >= 0 (class index), "
                                    f"got {rec['label']!r}") from None
                if label < 0:
                    raise DataError(f"{source}:{n}: 'label' must be >= 0, got {label}")
            items.append(Item(str(path), str(rec.get("caption", "")), label))
    else:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if labels == "folders":
            classes = sorted({p.parent.relative_to(source).as_posix() for p in files})
            if classes == ["."]:
                raise DataError(f"--labels folders: {source} has no class subfolders")
        elif labels == "jsonl":
            raise DataError("--labels jsonl needs a .jsonl input")
        for p in files:
            txt = p.with_suffix(".txt")
            caption = txt.read_text().strip() if txt.is_file() else ""
            label = classes.index(p.parent.relative_to(source).as_posix()) if classes else -1
            items.append(Item(str(p), caption, label))
    if not items:
        raise DataError(f"input {source}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    items.sort(key=lambda it: it.path)
    return items, classes


def default_buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """Image sizes (H, W) of about resolution^2 pixels for :data:`DEFAULT_RATIOS`, both sides
    multiples of ``multiple``."""
    out: list[tuple[int, int]] = []
    for r in DEFAULT_RATIOS:
        h = max(multiple, round(resolution / math.sqrt(r) / multiple) * multiple)
        w = max(multiple, round(resolution * math.sqrt(r) / multiple) * multiple)
        if (h, w) not in out:
            out.append((h, w))
    return out


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket closest in log aspect ratio (ties: the first)."""
    ar = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ar))


def load_image(path: str, buckets: Sequence[tuple[int, int]]) -> tuple[np.ndarray, tuple[int, int], int]:
    """(uint8 (H, W, 3) resized+cropped to its bucket, original (h, w), bucket index)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        k = choose_bucket(h, w, buckets)
        bh, bw = buckets[k]
        scale = max(bh / h, bw / w)
        nh, nw = max(bh, math.ceil(h * scale - 1e-6)), max(bw, math.ceil(w * scale - 1e-6))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = (nh - bh) // 2, (nw - bw) // 2
        im = im.crop((left, top, left + bw, top + bh))
        return np.asarray(im, dtype=np.uint8), (h, w), k


# ----------------------------------------------------------------------------- models


def _device_dtype(opts: EncodeOptions) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if opts.device == "auto" else opts.device))
    if opts.dtype == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, opts.dtype)
    return dev, dtype


def load_vae(name: str, subfolder: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"--vae {name!r}{f' (subfolder {subfolder})' if subfolder else ''}: cannot load an "
                        f"AutoencoderKL ({str(exc).splitlines()[0]})") from None
    return vae.to(device).eval()


def vae_factor(vae: Any) -> int:
    """Spatial downsampling of the VAE encoder: 2^(number of down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_text_encoder(name: str, subfolder: str | None, tokenizer: str | None, tokenizer_subfolder: str | None,
                      device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    where = f"--text-encoder {name!r}{f' (subfolder {subfolder})' if subfolder else ''}"
    try:
        conf = AutoConfig.from_pretrained(name, subfolder=subfolder or "")
        cls_name = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                    "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}.get(conf.model_type, "AutoModel")
        cls = getattr(transformers, cls_name)
        model = cls.from_pretrained(name, subfolder=subfolder or "")
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot load a text encoder ({str(exc).splitlines()[0]})") from None
    tok_name = tokenizer or name
    tok_sub = tokenizer_subfolder if tokenizer else (tokenizer_subfolder or subfolder)
    try:
        tok = AutoTokenizer.from_pretrained(tok_name, subfolder=tok_sub or "")
    except (OSError, ValueError) as exc:
        raise DataError(f"tokenizer {tok_name!r}: cannot load ({str(exc).splitlines()[0]}); "
                        "pass --tokenizer/--tokenizer-subfolder") from None
    return model.to(device=device, dtype=dtype).eval(), tok


def default_max_length(tok: Any) -> int:
    m = getattr(tok, "model_max_length", None)
    return int(m) if isinstance(m, int) and 0 < m <= 512 else 77


@torch.no_grad()
def encode_images(vae: Any, pixels: np.ndarray, indices: Sequence[int], opts: EncodeOptions,
                  device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 latents (B, C, H/f, W/f)."""
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    z = dist.mean.float()
    if opts.latent == "sample":
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(mix_seed(opts.seed, i)))
                             for i in indices]).to(z.device)
        z = z + dist.std.float() * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    return ((z - shift) * scale).cpu().numpy()


@torch.no_grad()
def encode_text(model: Any, tok: Any, captions: Sequence[str], max_length: int,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (float32 (B, L, D) hidden states, uint8 (B, L) mask)."""
    enc = tok(list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    out = model(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state.float()
    mask = mask.clone()
    mask[:, 0] = 1
    hidden = hidden * mask[..., None].to(hidden.dtype)  # zero the padding positions
    return hidden.cpu().numpy(), mask.to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- driver


def _digest(items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.path}\0{it.caption}\0{it.label}\n".encode())
    return h.hexdigest()


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    state = out / STATE_DIR
    plan_path = state / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            raise DataError(f"{out} holds an unfinished or finished encode with different settings "
                            f"({', '.join(diff)} differ); use another --out or delete it")
        return
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty and holds no ditperf encode state; use an empty --out")
    state.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2))
    os.replace(tmp, plan_path)


def encode_dataset(source: str | Path, out: str | Path, opts: EncodeOptions) -> DatasetSchema:
    """Encode ``source`` into the dataset folder ``out`` (resumable, see the module doc)."""
    out = Path(out)
    if opts.latent not in ("mean", "sample"):
        raise DataError(f"--latent must be mean or sample, got {opts.latent!r}")
    if opts.batch_size < 1 or opts.chunk_size < 1:
        raise DataError("--batch-size and --chunk-size must be >= 1")
    items, classes = list_inputs(source, opts.labels)
    device, dtype = _device_dtype(opts)
    vae = load_vae(opts.vae, opts.vae_subfolder, device, dtype)
    f = vae_factor(vae)
    sizes = parse_buckets(opts.buckets) or default_buckets(opts.resolution, 4 * f)
    bad = [f"{h}x{w}" for h, w in sizes if h % f or w % f]
    if bad:
        raise DataError(f"--buckets {', '.join(bad)}: image sizes must be multiples of the VAE factor {f}")
    text_model = tok = None
    max_length = text_dim = None
    if opts.text_encoder:
        text_model, tok = load_text_encoder(opts.text_encoder, opts.text_encoder_subfolder, opts.tokenizer,
                                            opts.tokenizer_subfolder, device, dtype)
        max_length = opts.max_length or default_max_length(tok)
        text_dim = int(text_model.config.hidden_size)
    elif opts.labels == "none":
        raise DataError("give --text-encoder (a text dataset) or --labels folders|jsonl (a class dataset)")
    labels_used = [it.label for it in items if it.label >= 0]
    num_classes = opts.num_classes or (len(classes) if classes else (max(labels_used) + 1 if labels_used else None))
    schema = DatasetSchema(
        conditioning="text" if text_model is not None else "class",
        latent_channels=int(vae.config.latent_channels),
        buckets=[Bucket(h // f, w // f) for h, w in sizes],
        text_len=max_length, text_dim=text_dim, num_classes=num_classes, preset=None,
        source={"kind": "encode", "input": str(source), "vae": opts.vae, "vae_subfolder": opts.vae_subfolder,
                "text_encoder": opts.text_encoder, "vae_factor": f, "image_buckets": [f"{h}x{w}" for h, w in sizes],
                "latent": f"({opts.latent} - shift_factor) * scaling_factor",
                "scaling_factor": getattr(vae.config, "scaling_factor", None),
                "shift_factor": getattr(vae.config, "shift_factor", None), "classes": classes},
    )
    plan = {"inputs": _digest(items), "num_items": len(items), **opts.plan_fields(),
            "image_buckets": [f"{h}x{w}" for h, w in sizes], "max_length": max_length}
    _check_plan(out, plan)
    state = out / STATE_DIR
    chunks = [items[i:i + opts.chunk_size] for i in range(0, len(items), opts.chunk_size)]
    from tqdm.auto import tqdm

    markers = [state / f"chunk-{ci:05d}.json" for ci in range(len(chunks))]  # written when a chunk is done
    for ci, marker in enumerate(markers):  # a finished chunk whose parts are gone or changed is redone
        if marker.is_file() and not _chunk_intact(marker, ci, out, schema):
            print(f"ditperf data encode: chunk {ci}'s shards are missing or incomplete; encoding it again",
                  flush=True)
            marker.unlink()
    done_items = sum(len(c) for c, marker in zip(chunks, markers) if marker.is_file())
    bar = tqdm(total=len(items), initial=done_items, desc="encode", unit="img", disable=not opts.progress,
               dynamic_ncols=True)
    try:
        for ci, (chunk, marker) in enumerate(zip(chunks, markers)):
            if marker.is_file():
                continue
            skipped: list[str] = []
            counts = _encode_chunk(ci, chunk, ci * opts.chunk_size, out, schema, sizes, vae, text_model, tok,
                                   max_length, opts, device, dtype, bar, skipped)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"chunk": ci, "counts": counts, "skipped": skipped}))
            os.replace(tmp, marker)
    finally:
        bar.close()
    # every run's skips, from the chunk markers (a resumed encode keeps the earlier runs' list)
    all_skipped = [p for marker in markers for p in json.loads(marker.read_text()).get("skipped", [])]
    if all_skipped:
        (state / "skipped.txt").write_text("\n".join(all_skipped) + "\n")
    for b in schema.buckets:
        bdir = out / b.dir
        b.samples = merge_parts(bdir) if bdir.is_dir() else 0
    schema.buckets = [b for b in schema.buckets if b.samples > 0]
    if not schema.buckets:
        raise DataError(f"no image could be encoded from {source}")
    schema.save(out)
    return schema


def _chunk_intact(marker: Path, ci: int, out: Path, schema: DatasetSchema) -> bool:
    """Whether a finished chunk's part folders still hold what its marker recorded."""
    try:
        counts = json.loads(marker.read_text())["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    dirs = {b.name: b.dir for b in schema.buckets}
    for name, n in counts.items():
        index = out / dirs.get(name, name) / f"part-{ci:05d}" / "index.json"
        try:
            shards = json.loads(index.read_text())["shards"]
            if sum(int(sh["samples"]) for sh in shards) != int(n):
                return False
            if not all((index.parent / (sh.get("zip_data") or sh["raw_data"])["basename"]).is_file()
                       for sh in shards):
                return False
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return True


def _encode_chunk(ci: int, chunk: Sequence[Item], first_index: int, out: Path, schema: DatasetSchema,
                  sizes: Sequence[tuple[int, int]], vae: Any, text_model: Any, tok: Any, max_length: int | None,
                  opts: EncodeOptions, device: torch.device, dtype: torch.dtype, bar: Any,
                  skipped: list[str]) -> dict[str, int]:
    part = f"part-{ci:05d}"
    for b in schema.buckets:  # leftovers of an interrupted attempt at this chunk
        for leftover in (out / b.dir / part, out / b.dir / f"{part}.tmp"):
            if leftover.exists():
                shutil.rmtree(leftover)

    def load(idx_item: tuple[int, Item]) -> tuple[int, Item, Any]:
        idx, item = idx_item
        try:
            return idx, item, load_image(item.path, sizes)
        except Exception as exc:  # noqa: BLE001 - reported with the file name below
            return idx, item, exc

    by_bucket: dict[int, list[tuple[int, Item, np.ndarray, tuple[int, int]]]] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for idx, item, res in pool.map(load, enumerate(chunk, first_index)):
            if isinstance(res, Exception):
                if not opts.skip_bad:
                    raise DataError(f"cannot read image {item.path}: {type(res).__name__}: {res}")
                skipped.append(item.path)
                bar.update(1)
                continue
            pixels, src, k = res
            by_bucket.setdefault(k, []).append((idx, item, pixels, src))
    counts: dict[str, int] = {}
    for k, entries in sorted(by_bucket.items()):
        bucket = schema.buckets[k]
        tmp_dir = out / bucket.dir / f"{part}.tmp"
        tmp_dir.parent.mkdir(parents=True, exist_ok=True)
        writer = open_writer(tmp_dir, schema, bucket)
        try:
            for s in range(0, len(entries), opts.batch_size):
                batch = entries[s:s + opts.batch_size]
                lat = encode_images(vae, np.stack([e[2] for e in batch]), [e[0] for e in batch], opts, device, dtype)
                if text_model is not None:
                    text, mask = encode_text(text_model, tok, [e[1].caption for e in batch], max_length, device)
                for j, (_, item, _, src) in enumerate(batch):
                    if text_model is not None:
                        sample = make_sample(lat[j], label=item.label, caption=item.caption, source_size=src,
                                             text=text[j], text_mask=mask[j])
                    else:
                        sample = make_sample(lat[j], label=item.label, caption=item.caption, source_size=src)
                    writer.write(sample)
                bar.update(len(batch))
        finally:
            writer.finish()
        os.replace(tmp_dir, out / bucket.dir / part)
        counts[bucket.name] = len(entries)
    return counts
