"""Latent datasets: the MDS schema, synthetic data, validation and reading for training.

Layout of a ditperf dataset folder (written by ``ditperf data synth`` / ``ditperf data encode``)::

    DIR/ditperf_schema.json     # conditioning, latent channels, text shape, buckets, provenance
    DIR/<H>x<W>/index.json      # one MDS dataset per aspect-ratio bucket (latent H x W)
    DIR/<H>x<W>/shard.00000.mds.zstd          (synth)   or
    DIR/<H>x<W>/part-00000/shard.00000.mds.zstd (encode: one sub-folder per resumable chunk,
                                                 listed by the bucket's merged index.json)

Columns (MDS encodings; fixed shapes per bucket so reads are a zero-copy ``frombuffer``):

=============  ===========================  ===============================================
column         encoding                     meaning
=============  ===========================  ===============================================
``latent``     ``ndarray:float16:C,H,W``    VAE latent, already multiplied by the scaling factor
``label``      ``int``                      class id (class datasets); -1 when there is none
``caption``    ``str``                      the caption ('' for class datasets)
``source_size````ndarray:int32:2``          original image (height, width) in pixels
``bucket``     ``str``                      ``"HxW"`` of the latent
``text``       ``ndarray:float16:L,D``      text datasets only: text-encoder hidden states
``text_mask``  ``ndarray:uint8:L``          text datasets only: 1 = real token
=============  ===========================  ===============================================

Reading (:func:`build_dataset`): one Streaming ``Stream`` per bucket, read through a single
:class:`LatentDataset` (a ``StreamingDataset``) with ``batching_method="per_stream"``: Streaming
forms every *global* batch from one stream, so a batch never mixes buckets, and its shuffle
(seeded, deterministic) and mid-epoch resumption state (``state_dict``, saved by Composer in
its checkpoints) cover the bucket order too. :func:`collate` still checks that all latents of a
batch have one shape and fails loudly otherwise.

Edit configs get their ``edit_mask`` / ``edit_source`` built per sample in the data workers by
the model's ``make_edit_batch`` with a ``torch.Generator`` seeded by (seed, epoch, sample id):
the same sample gets the same mask in the same epoch whatever the number of ranks or workers,
and a resumed run rebuilds exactly the masks of the uninterrupted one.

Traps handled here: a ``StreamingDataset`` already iterated in one process cannot be reused by
forked DataLoader workers (filelock), so build a fresh dataset for every loader that uses
workers; and Streaming validates shard hashes only when it decompresses or downloads a shard,
so :func:`verify_dataset` checks files and hashes up front with errors that name the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # heavy imports stay lazy: `ditperf --help` must not import streaming
    from ditperf.model.config import DiTConfig

SCHEMA_FILE = "ditperf_schema.json"
SCHEMA_FORMAT = "ditperf-mds"
SCHEMA_VERSION = 1
COMPRESSION = "zstd"
HASH = "xxh64"
DEFAULT_SIZE_LIMIT = 1 << 26  # 64 MiB of raw samples per shard (Streaming's default)


class DataError(ValueError):
    """A dataset problem the user must fix (names the file / column / bucket involved)."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class Bucket:
    """One aspect-ratio bucket: latents of exactly (C, height, width), in ``DIR/<dir>``."""

    height: int
    width: int
    samples: int = 0

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def dir(self) -> str:
        return self.name


@dataclass
class DatasetSchema:
    """What every shard of a ditperf dataset holds; stored as ``DIR/ditperf_schema.json``.

    ``conditioning`` is ``"class"`` (columns latent, label, caption, source_size, bucket) or
    ``"text"`` (the same plus ``text`` (L, D) and ``text_mask`` (L,)).
    """

    conditioning: str
    latent_channels: int
    buckets: list[Bucket]
    text_len: int | None = None
    text_dim: int | None = None
    num_classes: int | None = None
    preset: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conditioning not in ("class", "text"):
            raise DataError(f"schema: conditioning must be 'class' or 'text', got {self.conditioning!r}")
        if self.conditioning == "text" and (not self.text_len or not self.text_dim):
            raise DataError("schema: text datasets need text_len and text_dim")
        if self.latent_channels < 1:
            raise DataError(f"schema: latent_channels must be >= 1, got {self.latent_channels}")
        names = [b.name for b in self.buckets]
        if len(set(names)) != len(names):
            raise DataError(f"schema: duplicate buckets in {names}")

    @property
    def total_samples(self) -> int:
        return sum(b.samples for b in self.buckets)

    def columns(self, bucket: Bucket) -> dict[str, str]:
        """MDS column encodings for one bucket."""
        cols = {
            "latent": f"ndarray:float16:{self.latent_channels},{bucket.height},{bucket.width}",
            "label": "int",
            "caption": "str",
            "source_size": "ndarray:int32:2",
            "bucket": "str",
        }
        if self.conditioning == "text":
            cols["text"] = f"ndarray:float16:{self.text_len},{self.text_dim}"
            cols["text_mask"] = f"ndarray:uint8:{self.text_len}"
        return cols

    def to_json(self) -> dict[str, Any]:
        doc = {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, **asdict(self)}
        doc["buckets"] = [{"name": b.name, **asdict(b)} for b in self.buckets]
        doc["total_samples"] = self.total_samples
        doc["columns"] = {b.name: self.columns(b) for b in self.buckets}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str = "schema") -> DatasetSchema:
        if doc.get("format") != SCHEMA_FORMAT:
            raise DataError(f"{where}: not a ditperf dataset schema (format={doc.get('format')!r})")
        if int(doc.get("version", -1)) > SCHEMA_VERSION:
            raise DataError(f"{where}: schema version {doc['version']} is newer than this ditperf "
                            f"understands ({SCHEMA_VERSION}); upgrade ditperf")
        try:
            buckets = [Bucket(int(b["height"]), int(b["width"]), int(b.get("samples", 0))) for b in doc["buckets"]]
            return cls(conditioning=doc["conditioning"], latent_channels=int(doc["latent_channels"]),
                       buckets=buckets, text_len=doc.get("text_len"), text_dim=doc.get("text_dim"),
                       num_classes=doc.get("num_classes"), preset=doc.get("preset"),
                       source=dict(doc.get("source") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed schema ({type(exc).__name__}: {exc})") from exc

    def save(self, root: str | Path) -> Path:
        """Write the schema atomically (tmp file + rename)."""
        path = Path(root) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: str | Path) -> DatasetSchema:
        root = Path(root)
        path = root / SCHEMA_FILE
        if not root.exists():
            raise DataError(f"dataset folder {root} does not exist")
        if not path.is_file():
            hint = (" (it has an index.json: a plain MDS dataset; ditperf needs the schema file "
                    "written by `ditperf data synth` or `ditperf data encode`)") if (root / "index.json").exists() else ""
            raise DataError(f"{root} is not a ditperf dataset: {SCHEMA_FILE} is missing{hint}")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(doc, where=str(path))


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """``"32x48"`` -> (32, 48) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DataError(f"{what} {text!r}: expected HxW, e.g. 32x32") from None
    if h < 1 or w < 1:
        raise DataError(f"{what} {text!r}: both sides must be >= 1")
    return h, w


def parse_buckets(spec: str | Sequence[str] | None, what: str = "--buckets") -> list[tuple[int, int]]:
    """``"32x32,24x40"`` (or a list of such strings) -> [(32, 32), (24, 40)]."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in part.split(",")]
    sizes = [parse_size(s.strip(), what) for s in items if s.strip()]
    if len(set(sizes)) != len(sizes):
        raise DataError(f"{what}: duplicate sizes in {spec!r}")
    return sizes


def schema_for_config(config: DiTConfig, buckets: Sequence[tuple[int, int]] | None = None,
                      num_classes: int | None = None) -> DatasetSchema:
    """The dataset schema a model config trains on (latent channels, text shape or classes)."""
    sizes = list(buckets) if buckets else [tuple(config.latent_size)]
    text = config.conditioning == "text"
    return DatasetSchema(
        conditioning=config.conditioning, latent_channels=config.latent_channels,
        buckets=[Bucket(h, w) for h, w in sizes],
        text_len=config.text_len if text else None, text_dim=config.text_dim if text else None,
        num_classes=None if text else (num_classes or config.num_classes), preset=config.name,
    )


def check_compatible(schema: DatasetSchema, config: DiTConfig, root: str | Path) -> None:
    """Raise :class:`DataError` when ``config`` cannot train on the dataset at ``root``."""
    where = f"dataset {root}"
    if schema.conditioning != config.conditioning:
        raise DataError(f"{where} is {schema.conditioning}-conditioned but model {config.name!r} expects "
                        f"{config.conditioning} conditioning (set model.conditioning or use another dataset)")
    if schema.latent_channels != config.latent_channels:
        raise DataError(f"{where}: column 'latent' has {schema.latent_channels} channels but model "
                        f"{config.name!r} expects latent_channels={config.latent_channels} "
                        f"(in_channels={config.in_channels})")
    p = config.patch_size
    for b in schema.buckets:
        if b.height % p or b.width % p:
            raise DataError(f"{where}: bucket {b.name} (column 'latent', {root}/{b.dir}) is not divisible by "
                            f"model {config.name!r} patch size {p}; latent sizes must be multiples of {p}")
    if config.conditioning == "text" and schema.text_dim != config.text_dim:
        raise DataError(f"{where}: column 'text' has width D={schema.text_dim} but model {config.name!r} "
                        f"expects text_dim={config.text_dim} (re-encode with a matching text encoder or "
                        f"set model.text_dim)")
    if config.conditioning == "class" and schema.num_classes and schema.num_classes > config.num_classes:
        raise DataError(f"{where}: column 'label' has {schema.num_classes} classes but model "
                        f"{config.name!r} has num_classes={config.num_classes}")


# --------------------------------------------------------------------------------------------
# Validation of the files on disk
# --------------------------------------------------------------------------------------------


def _xxh64_file(path: Path) -> str:
    import xxhash

    h = xxhash.xxh64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _bucket_index(root: Path, bucket: Bucket) -> tuple[Path, dict[str, Any]]:
    index = root / bucket.dir / "index.json"
    if not index.is_file():
        raise DataError(f"dataset {root}: bucket {bucket.name} has no index file {index} "
                        f"(missing or incomplete write)")
    try:
        return index, json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{index}: corrupt index file ({exc})") from exc


def verify_dataset(root: str | Path, schema: DatasetSchema | None = None, mode: str = "auto",
                   auto_hash_limit_bytes: int = 2 << 30) -> DatasetSchema:
    """Check a local dataset against its schema before training; return the schema.

    ``mode``: ``"none"`` (schema only), ``"size"`` (every shard listed in each bucket's
    index.json exists with the listed byte size, columns match the schema), ``"hashes"`` (also
    recompute each shard's xxh64, ~GB/s), ``"auto"`` (hashes when the dataset is under
    ``auto_hash_limit_bytes``, else size). Both forms of a shard are checked when present:
    Streaming decompresses ``shard.N.mds.zstd`` to ``shard.N.mds`` next to it on first read of a
    local dataset (and reads the ``.mds`` from then on); a shard is missing only when neither is.
    A shard that fails Streaming's own hash check later, while a loader decompresses it, stops
    the run with a :class:`DataError` naming it (``LatentDataset.prepare_shard``).
    """
    root = Path(root)
    schema = schema or DatasetSchema.load(root)
    if mode not in ("auto", "size", "hashes", "none"):
        raise DataError(f"data.verify must be one of auto, size, hashes, none; got {mode!r}")
    if schema.total_samples == 0 or not schema.buckets:
        raise DataError(f"dataset {root} is empty: {SCHEMA_FILE} lists 0 samples")
    if mode == "none":
        return schema
    plans: list[tuple[Path, str | None, int]] = []  # (file, expected hash, expected bytes)
    for bucket in schema.buckets:
        index_path, index = _bucket_index(root, bucket)
        try:
            n = _plan_bucket(schema, bucket, index_path, index, plans)
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{index_path}: malformed index file ({type(exc).__name__}: {exc}); "
                            f"re-create bucket {bucket.name}") from exc
        if n != bucket.samples:
            raise DataError(f"{index_path}: lists {n} samples but {SCHEMA_FILE} says bucket {bucket.name} "
                            f"has {bucket.samples} (incomplete write?)")
    total_bytes = sum(b for _, _, b in plans)
    do_hash = mode == "hashes" or (mode == "auto" and total_bytes <= auto_hash_limit_bytes)
    for path, digest, nbytes in plans:
        size = path.stat().st_size
        if size != nbytes:
            raise DataError(f"corrupt shard {path}: {size} bytes on disk, index.json says {nbytes}")
        if do_hash and digest is not None and _xxh64_file(path) != digest:
            raise DataError(f"corrupt shard {path}: {HASH} hash mismatch (index.json says {digest}); "
                            f"restore the file or re-create the dataset")
    return schema


def _plan_bucket(schema: DatasetSchema, bucket: Bucket, index_path: Path, index: dict[str, Any],
                 plans: list[tuple[Path, str | None, int]]) -> int:
    """Check one bucket's index against the schema, append its shard files to ``plans``
    and return its sample count."""
    expected_cols = schema.columns(bucket)
    n = 0
    if not isinstance(index, dict) or not isinstance(index.get("shards", []), list):
        raise DataError(f"{index_path}: malformed index file (expected an object with a 'shards' list)")
    for shard in index.get("shards", []):
        cols = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        for name, enc in expected_cols.items():
            if cols.get(name) != enc:
                raise DataError(f"{index_path}: column {name!r} is {cols.get(name)!r} but {SCHEMA_FILE} "
                                f"says {enc!r} (schema mismatch)")
        n += int(shard.get("samples", 0))
        raw, zipped = shard.get("raw_data"), shard.get("zip_data")
        raw_path = index_path.parent / raw["basename"]
        zip_path = index_path.parent / zipped["basename"] if zipped else None
        present = False
        for path, info in ((raw_path, raw), (zip_path, zipped)):
            if path is not None and path.is_file():
                plans.append((path, info.get("hashes", {}).get(HASH), int(info["bytes"])))
                present = True
        if not present:
            missing = zip_path or raw_path
            raise DataError(f"shard file missing: {missing} (listed in {index_path}); restore it "
                            f"or re-create bucket {bucket.name}")
    return n


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def open_writer(out: str | Path, schema: DatasetSchema, bucket: Bucket,
                size_limit: int = DEFAULT_SIZE_LIMIT) -> Any:
    """An ``MDSWriter`` for one bucket with ditperf's columns, zstd compression, xxh64 hashes."""
    from streaming import MDSWriter

    return MDSWriter(out=str(out), columns=schema.columns(bucket), compression=COMPRESSION,
                     hashes=[HASH], size_limit=size_limit)


def make_sample(latent: np.ndarray, *, label: int = -1, caption: str = "", source_size: tuple[int, int],
                text: np.ndarray | None = None, text_mask: np.ndarray | None = None) -> dict[str, Any]:
    """One MDS row (dtype conversions included)."""
    sample: dict[str, Any] = {
        "latent": np.ascontiguousarray(latent, dtype=np.float16),
        "label": int(label),
        "caption": caption,
        "source_size": np.asarray(source_size, dtype=np.int32),
        "bucket": f"{latent.shape[-2]}x{latent.shape[-1]}",
    }
    if text is not None:
        sample["text"] = np.ascontiguousarray(text, dtype=np.float16)
        sample["text_mask"] = np.asarray(text_mask, dtype=np.uint8)
    return sample


def merge_parts(bucket_dir: str | Path) -> int:
    """Write ``bucket_dir/index.json`` listing the shards of every finished ``part-*/index.json``
    (basenames prefixed by the part folder, as Streaming's merged indexes do); return samples."""
    bucket_dir = Path(bucket_dir)
    shards: list[dict[str, Any]] = []
    for part in sorted(p for p in bucket_dir.glob("part-*") if p.is_dir() and not p.name.endswith(".tmp")):
        index = part / "index.json"
        if not index.is_file():
            continue
        for shard in json.loads(index.read_text())["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part.name}/{shard[key]['basename']}"
            shards.append(shard)
    tmp = bucket_dir / "index.json.tmp"
    tmp.write_text(json.dumps({"version": 2, "shards": shards}))
    os.replace(tmp, bucket_dir / "index.json")
    return sum(int(s["samples"]) for s in shards)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

SYNTH_VOCAB = 64  # token ids of the synthetic "text encoder"


def _pattern(concept: int, channels: int, h: int, w: int, seed: int) -> np.ndarray:
    """A smooth, unit-variance latent pattern per concept: a few random 2-D cosines."""
    rng = np.random.default_rng([seed, 7, concept])
    ys = np.linspace(0, 2 * math.pi, h, endpoint=False)[:, None]
    xs = np.linspace(0, 2 * math.pi, w, endpoint=False)[None, :]
    out = np.zeros((channels, h, w), np.float32)
    for c in range(channels):
        for _ in range(3):
            fy, fx = rng.integers(0, 3, size=2)
            phase = rng.uniform(0, 2 * math.pi)
            out[c] += np.cos(fy * ys + fx * xs + phase) * rng.uniform(0.5, 1.0)
    out /= out.std() + 1e-6
    return out


def synth_dataset(out: str | Path, config: DiTConfig, num: int, *, buckets: Sequence[tuple[int, int]] | None = None,
                  seed: int = 0, num_concepts: int | None = None, noise: float = 0.3,
                  overwrite: bool = False, progress: bool = True) -> DatasetSchema:
    """Write ``num`` synthetic samples with ``config``'s schema to ``out``; return the schema.

    Each sample belongs to a "concept" c (its class label, or the first token of its caption):
    latent = pattern(c) + ``noise`` * N(0, 1) (unit-scale, like scaled VAE latents), so a model
    has something to learn (the loss goes down). Text samples get L embeddings from a fixed
    random token table (token 0 = the concept), a random number of real tokens, the rest padded.
    Samples are spread round-robin over ``buckets`` (latent sizes HxW; default: the preset's).
    """
    out = Path(out)
    if num < 1:
        raise DataError(f"--num must be >= 1, got {num}")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out} is not empty (use --overwrite to replace it)")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    schema = schema_for_config(config, buckets)
    if schema.conditioning == "class":
        concepts = num_concepts or min(schema.num_classes or 1000, 16)
    else:
        concepts = num_concepts or 16
    rng = np.random.default_rng(seed)
    if schema.conditioning == "text":
        table = np.random.default_rng([seed, 11]).standard_normal((SYNTH_VOCAB, schema.text_dim)).astype(np.float32)
    patterns: dict[tuple[int, int, int], np.ndarray] = {}
    counts = [0] * len(schema.buckets)
    writers = [open_writer(out / b.dir, schema, b) for b in schema.buckets]
    bar = _progress(num, "synth", progress)
    try:
        for i in range(num):
            k = i % len(schema.buckets)
            b = schema.buckets[k]
            concept = int(rng.integers(0, concepts))
            key = (concept, b.height, b.width)
            if key not in patterns:
                patterns[key] = _pattern(concept, schema.latent_channels, b.height, b.width, seed)
            latent = patterns[key] + noise * rng.standard_normal(patterns[key].shape, dtype=np.float32)
            src = (b.height * 8, b.width * 8)
            if schema.conditioning == "text":
                L = schema.text_len or 1
                n_real = int(rng.integers(1, L + 1))
                tokens = np.concatenate([[concept % SYNTH_VOCAB], rng.integers(0, SYNTH_VOCAB, size=L - 1)])
                text = table[tokens] * 0.5
                text[n_real:] = 0.0
                mask = np.zeros(L, np.uint8)
                mask[:n_real] = 1
                sample = make_sample(latent, label=concept, caption=f"synthetic concept {concept}",
                                     source_size=src, text=text, text_mask=mask)
            else:
                sample = make_sample(latent, label=concept, caption="", source_size=src)
            writers[k].write(sample)
            counts[k] += 1
            bar.update(1)
    finally:
        for w in writers:
            w.finish()
        bar.close()
    for b, n in zip(schema.buckets, counts):
        b.samples = n
    schema.num_classes = schema.num_classes if schema.conditioning == "class" else None
    schema.source = {"kind": "synth", "seed": seed, "concepts": concepts, "noise": noise}
    schema.save(out)
    return schema


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _decoder(encoding: str) -> tuple[int | None, Callable[[memoryview | bytes, int, int], Any]]:
    """(static size or None, decode(buffer, offset, size)) for one MDS column encoding."""
    if encoding.startswith("ndarray:") and encoding.count(":") == 2:
        _, dtype_name, shape_s = encoding.split(":")
        dtype = np.dtype(dtype_name)
        shape = tuple(int(s) for s in shape_s.split(","))
        count = int(np.prod(shape))

        def dec_nd(buf: Any, off: int, size: int) -> np.ndarray:
            return np.frombuffer(buf, dtype, count, off).reshape(shape)

        return count * dtype.itemsize, dec_nd
    if encoding == "int":
        return 8, lambda buf, off, size: struct.unpack_from("<q", buf, off)[0]
    if encoding == "str":
        return None, lambda buf, off, size: bytes(buf[off:off + size]).decode("utf-8")
    from streaming.base.format.mds.encodings import get_mds_encoded_size, mds_decode

    return get_mds_encoded_size(encoding), lambda buf, off, size: mds_decode(encoding, bytes(buf[off:off + size]))


class _OpenShard:
    """A raw ``.mds`` shard opened once per worker: its offset table is read once and a sample
    is one ``os.pread``, instead of Streaming's ``open`` + seek + two reads per sample
    (2-3x faster for small latents; no page faults, unlike ``mmap``, for large ones)."""

    def __init__(self, path: str, names: Sequence[str], encodings: Sequence[str],
                 sizes: Sequence[int | None], wanted: set[str]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        (n,) = struct.unpack("<I", os.pread(self.fd, 4, 0))
        self.offsets = np.frombuffer(os.pread(self.fd, 4 * (n + 1), 4), np.uint32)
        self.n_var = sum(1 for s in sizes if not s)
        self.plan = []  # (name, static size or -1 - index into the variable sizes, decoder, wanted)
        var_i = 0
        for name, enc, size in zip(names, encodings, sizes):
            _, dec = _decoder(enc)
            self.plan.append((name, size if size else -1 - var_i, dec, name in wanted))
            if not size:
                var_i += 1

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def read(self, idx: int) -> dict[str, Any]:
        begin, end = int(self.offsets[idx]), int(self.offsets[idx + 1])
        buf = os.pread(self.fd, end - begin, begin)
        if len(buf) != end - begin:
            raise DataError(f"shard {self.path} is truncated: sample {idx} needs bytes {begin}..{end}, "
                            f"the file has {os.fstat(self.fd).st_size}; restore it or re-create the dataset")
        var_sizes = struct.unpack_from(f"<{self.n_var}I", buf, 0) if self.n_var else ()
        off = 4 * self.n_var
        sample: dict[str, Any] = {}
        for name, size, dec, wanted in self.plan:
            size = size if size >= 0 else var_sizes[-1 - size]
            if wanted:
                sample[name] = dec(buf, off, size)
            off += size
        return sample


class _Edit:
    """Per-sample edit masks: ``make_edit_batch`` with a (seed, epoch, sample id) generator."""

    def __init__(self, task: str, seed: int) -> None:
        self.task, self.seed = task, seed

    def __call__(self, latent: np.ndarray, epoch: int, sample_id: int) -> dict[str, torch.Tensor]:
        from ditperf.model import make_edit_batch

        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, sample_id))
        x = torch.from_numpy(np.array(latent, dtype=np.float32))[None]
        out = make_edit_batch(x, self.task, g)
        return {"edit_mask": out["edit_mask"][0], "edit_source": out["edit_source"][0].to(torch.float16)}


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (numpy SeedSequence: well mixed, stable)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def _make_dataset_class() -> type:
    from streaming import StreamingDataset

    class LatentDataset(StreamingDataset):
        """``StreamingDataset`` over ditperf buckets: adds ``sample_id`` (and edit masks) to
        each sample, and reads raw shards through one open file per shard and worker when no
        cache limit is set (with a cache limit, Streaming may evict shards: its reader is used)."""

        def __init__(self, *, columns: Sequence[str], edit: _Edit | None = None, fast_read: bool = True,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._ditperf_fast = fast_read
            self._ditperf_columns = set(columns)
            self._ditperf_edit = edit
            self._ditperf_epoch = 0
            self._ditperf_maps: dict[int, _OpenShard] = {}

        def __getstate__(self) -> dict[str, Any]:  # open files do not travel to spawned workers
            state = self.__dict__.copy()
            state["_ditperf_maps"] = {}
            return state

        def _resume_incr_epoch(self) -> tuple[int, int]:
            # Called in each worker at the start of an epoch's iteration: remember the epoch
            # for the edit-mask seeds.
            epoch, sample_in_epoch = super()._resume_incr_epoch()
            self._ditperf_epoch = epoch
            return epoch, sample_in_epoch

        def _fast(self, sample_id: int) -> dict[str, Any] | None:
            if self.cache_limit or not self._ditperf_fast:
                return None  # the cache may evict shards: keep Streaming's own reader
            shard_id, idx = self.spanner[sample_id]
            opened = self._ditperf_maps.get(shard_id)
            if opened is None:
                reader = self.shards[shard_id]
                path = os.path.join(reader.dirname, reader.split or "", reader.raw_data.basename)
                if not os.path.isfile(path):
                    return None  # not decompressed/downloaded yet: Streaming prepares it
                opened = _OpenShard(path, reader.column_names, reader.column_encodings,
                                    reader.column_sizes, self._ditperf_columns)
                self._ditperf_maps[shard_id] = opened
            return opened.read(idx)

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            """Streaming's, plus a clear error naming the shard when preparing it fails
            (hash mismatch, truncated zstd, failed download). Streaming leaves such a shard
            in its shared PREPARING state, where every other worker waiting for it sleeps
            forever (a stalled run): the state is put back first, so they retry, fail the
            same way and stop too."""
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as exc:  # re-raised as a DataError naming the shard
                from streaming.base.dataset import _ShardState

                reader = self.shards[shard_id]
                where = os.path.join(reader.dirname, reader.split or "")
                names = [info.basename for pair in reader.file_pairs for info in pair if info is not None]
                # Streaming raises from the shard's download/decompression only in the caller
                # that moved it to PREPARING: this one. Back to LOCAL when a form of it is on
                # disk (decompress again), else REMOTE (download again).
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    local = any(os.path.isfile(os.path.join(where, n)) for n in names)
                    self._shard_states[shard_id] = _ShardState.LOCAL if local else _ShardState.REMOTE
                msg = (f"cannot read shard {', '.join(names)} in {where}: {type(exc).__name__}: {exc}; "
                       "restore the file (`ditperf data verify` checks every shard) or re-create the dataset")
                self._ditperf_failure = msg
                if hasattr(self, "_event"):
                    self._event.set()  # stop Streaming's background threads
                raise DataError(msg) from exc

        def __iter__(self) -> Iterator[dict[str, Any]]:
            """Streaming's iteration, but a shard that failed in a background prepare thread
            ends it with that DataError: Streaming's sample loop just stops when its threads
            fail (an epoch of 0 batches and no error, then a bare RuntimeError next epoch)."""
            try:
                yield from super().__iter__()
            except RuntimeError as exc:  # "Background thread failed": say what failed
                self._raise_failure(exc)
                raise
            self._raise_failure(None)

        def _raise_failure(self, cause: BaseException | None) -> None:
            """Raise the recorded shard failure (see prepare_shard) as a DataError, if any."""
            failure = getattr(self, "_ditperf_failure", None)
            if failure is not None:
                raise DataError(failure) from cause

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            sample = self._fast(sample_id)
            if sample is None:
                try:
                    full = super().get_item(sample_id, retry)
                except RuntimeError as exc:  # "Background thread failed": say what failed
                    self._raise_failure(exc)
                    raise
                sample = {k: v for k, v in full.items() if k in self._ditperf_columns}
            sample["sample_id"] = sample_id
            if self._ditperf_edit is not None:
                sample.update(self._ditperf_edit(sample["latent"], self._ditperf_epoch, sample_id))
            return sample

    return LatentDataset


_DATASET_CLASS: type | None = None


def dataset_class() -> type:
    """The :class:`LatentDataset` class (built lazily: importing streaming is slow)."""
    global _DATASET_CLASS
    if _DATASET_CLASS is None:
        _DATASET_CLASS = _make_dataset_class()
    return _DATASET_CLASS


def read_columns(schema: DatasetSchema) -> list[str]:
    cols = ["latent", "label"]
    if schema.conditioning == "text":
        cols += ["text", "text_mask"]
    return cols


def build_dataset(local: str | Path, *, batch_size: int, remote: str | None = None, shuffle: bool = True,
                  shuffle_seed: int = 9176, schema: DatasetSchema | None = None,
                  edit_task: str | None = None, edit_seed: int = 0,
                  columns: Sequence[str] | None = None, fast_read: bool = True, **streaming_kwargs: Any) -> Any:
    """A fresh :class:`LatentDataset` over every bucket of the dataset.

    ``local`` is the dataset folder, or with ``remote`` (any Streaming remote: s3://, gs://,
    a path...) the local cache folder. ``batch_size`` is the per-device batch size (Streaming
    partitions by it; the DataLoader must use the same). Build a new one for every DataLoader
    that uses worker processes. ``fast_read=False`` reads through Streaming's own per-sample
    reader instead of ditperf's open-once shard reader (same values; for benchmarks).
    """
    from streaming import Stream

    if schema is None:
        schema = _load_schema(local, remote)
    if schema.total_samples == 0:
        raise DataError(f"dataset {remote or local} is empty: {SCHEMA_FILE} lists 0 samples")
    streams = [Stream(remote=(f"{remote.rstrip('/')}/{b.dir}" if remote else None), local=str(Path(local) / b.dir))
               for b in schema.buckets if b.samples > 0]
    edit = _Edit(edit_task, edit_seed) if edit_task else None
    cls = dataset_class()
    return cls(streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=shuffle_seed,
               batching_method="per_stream", validate_hash=HASH, columns=columns or read_columns(schema),
               edit=edit, fast_read=fast_read, **streaming_kwargs)


def _load_schema(local: str | Path, remote: str | None) -> DatasetSchema:
    if remote is None or Path(local, SCHEMA_FILE).is_file():
        return DatasetSchema.load(local)
    # remote dataset: fetch the schema file into the local cache with Streaming's downloader
    from streaming.base.storage import CloudDownloader

    Path(local).mkdir(parents=True, exist_ok=True)
    url = f"{remote.rstrip('/')}/{SCHEMA_FILE}"
    try:
        CloudDownloader.get(remote).download(url, str(Path(local) / SCHEMA_FILE), 60)
    except Exception as exc:
        raise DataError(f"cannot fetch the dataset schema {url} ({type(exc).__name__}: {exc})") from exc
    return DatasetSchema.load(local)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the model's batch dict (see ``ditperf.model`` batch contract).

    ``latents`` / ``text`` / ``edit_source`` stay float16 (half the host->device traffic; the
    model casts), ``text_mask`` is bool, ``labels`` and ``sample_ids`` int64.
    """
    if not samples:
        raise DataError("empty batch")
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) != 1:
        raise DataError(f"batch mixes latent shapes {sorted(shapes)}: aspect-ratio buckets must not be mixed "
                        "(the DataLoader batch size must equal the dataset's batch_size)")
    batch: dict[str, torch.Tensor] = {
        "latents": torch.from_numpy(np.stack([s["latent"] for s in samples])),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "sample_ids": torch.tensor([s["sample_id"] for s in samples], dtype=torch.int64),
    }
    if "text" in samples[0]:
        batch["text"] = torch.from_numpy(np.stack([s["text"] for s in samples]))
        batch["text_mask"] = torch.from_numpy(np.stack([s["text_mask"] for s in samples])).bool()
    if "edit_mask" in samples[0]:
        batch["edit_mask"] = torch.stack([s["edit_mask"] for s in samples])
        batch["edit_source"] = torch.stack([s["edit_source"] for s in samples])
    return batch


def build_dataloader(dataset: Any, *, batch_size: int, num_workers: int = 2, pin_memory: bool | None = None,
                     prefetch_factor: int | None = None, persistent_workers: bool = False) -> Any:
    """A ``StreamingDataLoader`` with :func:`collate` and ``drop_last`` (per-bucket batches)."""
    from streaming import StreamingDataLoader

    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor or 2
        kwargs["persistent_workers"] = persistent_workers
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                               drop_last=True, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                               **kwargs)


def iter_samples(local: str | Path, columns: Iterable[str] | None = None) -> Iterable[dict[str, Any]]:
    """Every sample of every bucket in storage order, via Streaming's plain reader (for
    inspection and tests; no shuffling, no workers)."""
    from streaming import StreamingDataset

    schema = DatasetSchema.load(local)
    for b in schema.buckets:
        if b.samples == 0:
            continue
        ds = StreamingDataset(local=str(Path(local) / b.dir), shuffle=False, batch_size=1)
        try:
            for i in range(ds.num_samples):
                s = ds[i]
                yield {k: v for k, v in s.items() if columns is None or k in columns}
        finally:
            del ds
