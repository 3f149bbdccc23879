"""Datasets: schema, synth, Streaming reading (buckets, determinism, edit masks), bad data,
and `ditperf data encode` with a tiny random VAE + text encoder loaded from local folders."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ditperf.model import get_config, make_edit_batch
from ditperf.trainer import data as D


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text-conditioned tiny dataset, two buckets of 12 samples (read-only: copy to modify)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    D.synth_dataset(out, get_config("tiny"), 24, buckets=[(8, 8), (8, 12)], seed=3, progress=False)
    return out


def copy_ds(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/shard.*.mds*"))


def test_synth_schema_columns_and_readback(tiny_ds: Path) -> None:
    doc = json.loads((tiny_ds / D.SCHEMA_FILE).read_text())
    assert doc["conditioning"] == "text" and doc["latent_channels"] == 4
    assert (doc["text_len"], doc["text_dim"]) == (8, 32)
    assert [b["name"] for b in doc["buckets"]] == ["8x8", "8x12"] and doc["total_samples"] == 24
    index = json.loads((tiny_ds / "8x12" / "index.json").read_text())["shards"][0]
    assert index["compression"] == "zstd" and index["hashes"] == ["xxh64"]
    cols = dict(zip(index["column_names"], index["column_encodings"]))
    assert cols["latent"] == "ndarray:float16:4,8,12" and cols["text"] == "ndarray:float16:8,32"
    assert cols["text_mask"] == "ndarray:uint8:8"
    samples = list(D.iter_samples(tiny_ds))
    assert len(samples) == 24
    for s in samples:
        h, w = (int(v) for v in s["bucket"].split("x"))
        assert s["latent"].shape == (4, h, w) and s["latent"].dtype == np.float16
        m = s["text_mask"].astype(bool)
        assert m[0] and s["caption"].startswith("synthetic concept")
        assert np.all(s["text"][~m] == 0) and np.abs(s["text"][m]).sum() > 0
        assert abs(float(s["latent"].astype(np.float32).std()) - 1.0) < 0.5
    D.verify_dataset(tiny_ds, mode="hashes")


def _epoch_ids(root: Path, workers: int, seed: int = 5, edit: str | None = None) -> list[dict[str, torch.Tensor]]:
    ds = D.build_dataset(root, batch_size=4, shuffle=True, shuffle_seed=seed, edit_task=edit, edit_seed=11)
    return list(D.build_dataloader(ds, batch_size=4, num_workers=workers))


def test_loader_never_mixes_buckets_deterministic_shuffle(tiny_ds: Path) -> None:
    a = _epoch_ids(tiny_ds, workers=0)
    b = _epoch_ids(tiny_ds, workers=1)  # a fresh dataset for the forked worker
    c = _epoch_ids(tiny_ds, workers=0, seed=6)
    ids = [x["sample_ids"].tolist() for x in a]
    assert ids == [x["sample_ids"].tolist() for x in b]
    assert ids != [x["sample_ids"].tolist() for x in c]
    assert sorted(i for batch in ids for i in batch) == list(range(24))  # 12 per bucket, batch 4: all used
    shapes = set()
    for batch in a:
        assert batch["latents"].dtype == torch.float16 and batch["text_mask"].dtype == torch.bool
        assert batch["labels"].dtype == torch.int64 and batch["text"].shape == (4, 8, 32)
        shapes.add(tuple(batch["latents"].shape))
    assert shapes == {(4, 4, 8, 8), (4, 4, 8, 12)}
    # the fast mmap reader returns exactly what Streaming's own reader returns
    ref = {i: s for i, s in enumerate(D.iter_samples(tiny_ds))}
    for batch in a:
        for j, sid in enumerate(batch["sample_ids"].tolist()):
            assert torch.equal(batch["latents"][j], torch.from_numpy(np.array(ref[sid]["latent"])))
            assert torch.equal(batch["text"][j], torch.from_numpy(np.array(ref[sid]["text"])))
            assert batch["labels"][j].item() == ref[sid]["label"]


def test_uneven_buckets_never_mix_and_drop_only_partial_batches(tmp_path: Path) -> None:
    """Bucket sizes that are not multiples of the batch (7, 5, 9 with batch 4): every batch
    is one shape, and per bucket only its partial last batch is left out."""
    root = tmp_path / "uneven"
    D.synth_dataset(root, get_config("tiny"), 21, buckets=[(8, 8), (8, 12), (12, 8)], seed=2, progress=False)
    sizes = {b.name: b.samples for b in D.DatasetSchema.load(root).buckets}
    for workers in (0, 2):
        batches = _epoch_ids(root, workers=workers)
        per_shape: dict[tuple, int] = {}
        for batch in batches:
            assert len({tuple(x.shape) for x in batch["latents"]}) == 1
            shape = tuple(batch["latents"].shape[2:])
            per_shape[shape] = per_shape.get(shape, 0) + 1
        assert per_shape == {tuple(int(v) for v in name.split("x")): n // 4 for name, n in sizes.items() if n >= 4}
        ids = [i for b in batches for i in b["sample_ids"].tolist()]
        assert len(ids) == len(set(ids))


def test_edit_masks_seeded_by_seed_epoch_sample(tiny_ds: Path) -> None:
    a = _epoch_ids(tiny_ds, workers=0, edit="mixed")
    b = _epoch_ids(tiny_ds, workers=1, seed=9, edit="mixed")  # other order, same masks per sample
    by_id = {int(s): (bt["edit_mask"][j], bt["edit_source"][j]) for bt in b for j, s in enumerate(bt["sample_ids"])}
    for batch in a:
        for j, sid in enumerate(batch["sample_ids"].tolist()):
            mask, src = batch["edit_mask"][j], batch["edit_source"][j]
            assert torch.equal(mask, by_id[sid][0]) and torch.equal(src, by_id[sid][1])
            g = torch.Generator().manual_seed(D.mix_seed(11, 0, sid))
            ref = make_edit_batch(batch["latents"][j:j + 1].float(), "mixed", g)
            assert torch.equal(mask, ref["edit_mask"][0])
            assert torch.equal(src, (batch["latents"][j] * (1 - mask)).to(torch.float16))
            assert 0 < mask.sum() < mask.numel()


def test_edit_masks_change_with_the_epoch(tiny_ds: Path) -> None:
    """A second pass over the same dataset is epoch 1: every sample's mask is drawn from
    (seed, 1, sample id), so the model sees new edit regions each epoch instead of one fixed
    mask per sample for the whole run."""
    seed = random.randrange(2**31)
    ds = D.build_dataset(tiny_ds, batch_size=4, shuffle=True, shuffle_seed=random.randrange(2**31),
                         edit_task="mixed", edit_seed=seed)
    loader = D.build_dataloader(ds, batch_size=4, num_workers=0)
    epochs = []
    for epoch in range(2):
        masks = {}
        for batch in loader:
            for j, sid in enumerate(batch["sample_ids"].tolist()):
                g = torch.Generator().manual_seed(D.mix_seed(seed, epoch, sid))
                ref = make_edit_batch(batch["latents"][j:j + 1].float(), "mixed", g)
                assert torch.equal(batch["edit_mask"][j], ref["edit_mask"][0]), (epoch, sid)
                masks[sid] = batch["edit_mask"][j]
        assert sorted(masks) == list(range(24))
        epochs.append(masks)
    changed = sum(not torch.equal(epochs[0][sid], epochs[1][sid]) for sid in range(24))
    assert changed >= 12, changed


def test_remote_dataset_through_local_cache(tiny_ds: Path, tmp_path: Path) -> None:
    """data.remote (here a path; s3://, gs://... work the same) + data.local as the cache."""
    cache = tmp_path / "cache"
    ds = D.build_dataset(cache, remote=str(tiny_ds), batch_size=4, shuffle=True, shuffle_seed=5)
    ids = [b["sample_ids"].tolist() for b in D.build_dataloader(ds, batch_size=4, num_workers=0)]
    assert ids == [x["sample_ids"].tolist() for x in _epoch_ids(tiny_ds, workers=0)]
    assert (cache / D.SCHEMA_FILE).is_file() and list((cache / "8x12").glob("shard.*.mds"))
    with pytest.raises(D.DataError, match="cannot fetch the dataset schema"):
        D.build_dataset(tmp_path / "c2", remote=str(tmp_path / "nowhere"), batch_size=4)


def _flip_byte(path: Path) -> bytes:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return bytes(raw)


def test_corrupt_shard_hash_mismatch_names_file(tiny_ds: Path, tmp_path: Path) -> None:
    root = copy_ds(tiny_ds, tmp_path / "ds")
    zipped = root / "8x8" / "shard.00000.mds.zstd"
    (root / "8x8" / "shard.00000.mds").unlink(missing_ok=True)  # decompressed copy from earlier reads
    flipped = _flip_byte(zipped)
    for mode in ("hashes", "auto"):
        with pytest.raises(D.DataError, match=f"corrupt shard {zipped}.*hash mismatch"):
            D.verify_dataset(root, mode=mode)
    D.verify_dataset(root, mode="size")  # sizes only (large datasets): reading it will say so
    D.verify_dataset(root, mode="none")
    assert zipped.read_bytes() == flipped  # nothing is deleted or rewritten
    # a decompressed shard: sizes only in "size" mode (large datasets), hashes otherwise
    root2 = copy_ds(tiny_ds, tmp_path / "ds2")
    list(D.iter_samples(root2))  # Streaming decompresses every shard
    shard = root2 / "8x8" / "shard.00000.mds"
    _flip_byte(shard)
    with pytest.raises(D.DataError, match=f"corrupt shard {shard}.*hash mismatch"):
        D.verify_dataset(root2, mode="auto")
    D.verify_dataset(root2, mode="size")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_shard_found_while_reading_stops_with_its_name(tiny_ds: Path, tmp_path: Path,
                                                               workers: int) -> None:
    """A shard that fails Streaming's hash check while the loader decompresses it (no
    pre-flight check: data.verify=none, or a remote dataset) is a DataError naming it,
    from the main process and from a worker alike; Streaming alone left the shard
    "preparing" and the run stalled."""
    root = copy_ds(tiny_ds, tmp_path / "ds")
    for zipped in root.glob("*/shard.*.mds.zstd"):
        zipped.with_suffix("").unlink(missing_ok=True)
        _flip_byte(zipped)
    ds = D.build_dataset(root, batch_size=4, shuffle=True, shuffle_seed=1)
    loader = D.build_dataloader(ds, batch_size=4, num_workers=workers)
    if workers:
        loader.timeout = 120  # a stall fails the test instead of hanging it
    with pytest.raises(D.DataError, match=r"cannot read shard .*shard.00000.mds.zstd.*Checksum failure"):
        list(loader)


def test_missing_shard_and_truncated_shard(tiny_ds: Path, tmp_path: Path) -> None:
    root = copy_ds(tiny_ds, tmp_path / "ds")
    shard = root / "8x8" / "shard.00000.mds.zstd"
    (root / "8x8" / "shard.00000.mds").unlink(missing_ok=True)  # decompressed copy from earlier reads
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(D.DataError, match=f"corrupt shard {shard}: .* bytes on disk"):
        D.verify_dataset(root, mode="size")
    shard.unlink()
    with pytest.raises(D.DataError, match=f"shard file missing: {shard}"):
        D.verify_dataset(root, mode="size")
    index = root / "8x8" / "index.json"
    doc = json.loads(index.read_text())
    for broken, what in (([doc], "expected an object"), ({"shards": [dict(doc["shards"][0], raw_data=None)]}, "TypeError"),
                         ({"shards": [dict(doc["shards"][0], samples="twelve")]}, "ValueError")):
        index.write_text(json.dumps(broken))
        with pytest.raises(D.DataError, match=f"{index}: malformed index file.*{what}"):
            D.verify_dataset(root, mode="size")
    index.unlink()
    with pytest.raises(D.DataError, match="bucket 8x8 has no index file"):
        D.verify_dataset(root)


def test_schema_mismatch_errors_name_column(tiny_ds: Path, tmp_path: Path) -> None:
    schema = D.DatasetSchema.load(tiny_ds)
    with pytest.raises(D.DataError, match="column 'latent' has 4 channels .* latent_channels=16"):
        D.check_compatible(schema, get_config("t2i-1b"), tiny_ds)
    with pytest.raises(D.DataError, match="text-conditioned but model 'dit-s-2' expects class"):
        D.check_compatible(schema, get_config("dit-s-2"), tiny_ds)
    with pytest.raises(D.DataError, match="column 'text' has width D=32 .* text_dim=64"):
        D.check_compatible(schema, get_config("tiny", text_dim=64), tiny_ds)
    with pytest.raises(D.DataError, match="bucket 8x12 .* not divisible by .* patch size 8"):
        D.check_compatible(schema, get_config("tiny", patch_size=8), tiny_ds)
    D.check_compatible(schema, get_config("tiny"), tiny_ds)
    # shards whose columns disagree with the schema file
    root = copy_ds(tiny_ds, tmp_path / "ds")
    doc = json.loads((root / D.SCHEMA_FILE).read_text())
    doc["latent_channels"] = 8
    (root / D.SCHEMA_FILE).write_text(json.dumps(doc))
    with pytest.raises(D.DataError, match=r"8x8/index.json: column 'latent' is 'ndarray:float16:4,8,8'"):
        D.verify_dataset(root)


def test_empty_or_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="does not exist"):
        D.DatasetSchema.load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "index.json").write_text("{}")
    with pytest.raises(D.DataError, match="not a ditperf dataset.*plain MDS dataset"):
        D.DatasetSchema.load(tmp_path / "plain")
    empty = D.DatasetSchema(conditioning="class", latent_channels=4, buckets=[D.Bucket(8, 8, 0)], num_classes=10)
    (tmp_path / "empty").mkdir()
    empty.save(tmp_path / "empty")
    with pytest.raises(D.DataError, match="is empty"):
        D.verify_dataset(tmp_path / "empty")
    with pytest.raises(D.DataError, match="is empty"):
        D.build_dataset(tmp_path / "empty", batch_size=2)
    with pytest.raises(D.DataError, match="expected HxW"):
        D.parse_buckets("8x8,big")


def test_synth_class_preset_and_refuses_nonempty(tmp_path: Path) -> None:
    schema = D.synth_dataset(tmp_path / "c", get_config("dit-s-2"), 6, seed=1, progress=False)
    assert schema.conditioning == "class" and schema.num_classes == 1000
    samples = list(D.iter_samples(tmp_path / "c"))
    assert {s["latent"].shape for s in samples} == {(4, 32, 32)} and all("text" not in s for s in samples)
    assert all(0 <= s["label"] < 1000 for s in samples)
    with pytest.raises(D.DataError, match="not empty"):
        D.synth_dataset(tmp_path / "c", get_config("dit-s-2"), 6, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(D.DataError, match="exists and is not a folder"):
        D.synth_dataset(tmp_path / "file", get_config("dit-s-2"), 6, progress=False)


def test_verify_auto_hashes_only_under_the_limit(tiny_ds: Path, tmp_path: Path) -> None:
    """``auto`` recomputes hashes only while the dataset is under ``auto_hash_limit_bytes``
    (above it, hashing every shard of a multi-TB dataset before training would take hours):
    a flipped byte is found under the limit and passes the size-only check above it. An
    unknown mode (a typo such as ``hash``) is refused instead of silently checking less."""
    root = copy_ds(tiny_ds, tmp_path / "ds")
    for raw in root.glob("*/shard.*.mds"):
        raw.unlink()  # decompressed copies from earlier reads: only the .zstd forms remain
    shard = random.choice(_shards(root))
    _flip_byte(shard)
    total = sum(p.stat().st_size for p in _shards(root))
    with pytest.raises(D.DataError, match=f"corrupt shard {shard}.*hash mismatch"):
        D.verify_dataset(root, mode="auto", auto_hash_limit_bytes=total)
    assert D.verify_dataset(root, mode="auto", auto_hash_limit_bytes=total - 1).total_samples == 24
    for typo in ("hash", "sizes", "Auto", ""):
        with pytest.raises(D.DataError, match=f"data.verify must be one of auto, size, hashes, none; got {typo!r}"):
            D.verify_dataset(root, mode=typo)


def test_verify_counts_samples_and_checks_every_column(tiny_ds: Path, tmp_path: Path) -> None:
    """A bucket whose index lists other than the schema's sample count (a half-written
    bucket), and shards without a column the schema promises (a class dataset's shards under
    a text schema: the loader would fail on the first batch), are refused up front with the
    index file named; every column counts, not only ``latent``."""
    root = copy_ds(tiny_ds, tmp_path / "ds")
    doc = json.loads((root / D.SCHEMA_FILE).read_text())
    k = random.randrange(2)
    name = doc["buckets"][k]["name"]
    extra = random.randint(1, 5)
    doc["buckets"][k]["samples"] += extra
    (root / D.SCHEMA_FILE).write_text(json.dumps(doc))
    with pytest.raises(D.DataError, match=f"{name}/index.json: lists 12 samples but .* bucket {name} has {12 + extra}"):
        D.verify_dataset(root, mode="size")
    doc["buckets"][k]["samples"] -= extra
    (root / D.SCHEMA_FILE).write_text(json.dumps(doc))
    D.verify_dataset(root, mode="size")
    index = root / name / "index.json"
    original = index.read_text()
    for column in ("text", "text_mask", "label", "caption", "source_size", "bucket"):
        idx = json.loads(original)
        for shard in idx["shards"]:
            i = shard["column_names"].index(column)
            del shard["column_names"][i], shard["column_encodings"][i]
        index.write_text(json.dumps(idx))
        with pytest.raises(D.DataError, match=f"{name}/index.json: column '{column}' is None but"):
            D.verify_dataset(root, mode="size")
    index.write_text(original)
    D.verify_dataset(root, mode="hashes")


def test_verify_checks_the_compressed_form_next_to_a_decompressed_one(tiny_ds: Path, tmp_path: Path) -> None:
    """Once Streaming has decompressed a local shard both forms sit side by side; both are
    checked (a remote copy or a later ``rm *.mds`` makes the .zstd the one read again), so a
    corrupt ``.zstd`` next to an intact ``.mds`` is still reported, by name."""
    root = copy_ds(tiny_ds, tmp_path / "ds")
    list(D.iter_samples(root))  # every shard decompressed
    zipped = random.choice(sorted(root.glob("*/shard.*.mds.zstd")))
    assert zipped.with_suffix("").is_file()
    _flip_byte(zipped)
    with pytest.raises(D.DataError, match=f"corrupt shard {zipped}.*hash mismatch"):
        D.verify_dataset(root, mode="hashes")


def test_collate_refuses_mixed_buckets_and_keeps_values() -> None:
    """:func:`collate` is the last guard against a batch that mixes aspect-ratio buckets (a
    DataLoader batch size other than the dataset's): two latent shapes are a DataError, even
    when only one sample differs; a one-shape batch is stacked value for value."""
    n = random.randint(2, 6)
    samples = [{"latent": (np.random.rand(4, 8, 8) + 0.5).astype(np.float16), "label": random.randrange(10),
                "sample_id": random.randrange(1000)} for _ in range(n)]
    batch = D.collate(samples)
    assert torch.equal(batch["latents"], torch.from_numpy(np.stack([s["latent"] for s in samples])))
    assert batch["labels"].tolist() == [s["label"] for s in samples]
    assert batch["sample_ids"].tolist() == [s["sample_id"] for s in samples]
    odd = dict(samples[random.randrange(n)], latent=np.random.rand(4, 8, 12).astype(np.float16))
    with pytest.raises(D.DataError, match=r"batch mixes latent shapes \[\(4, 8, 8\), \(4, 8, 12\)\]"):
        D.collate([*samples, odd])
    with pytest.raises(D.DataError, match="empty batch"):
        D.collate([])


def test_fast_reader_decodes_every_column(tiny_ds: Path, tmp_path: Path) -> None:
    """The open-once shard reader decodes the variable-size columns (caption, bucket: two
    strings, each with its own size in the sample header) and the typed ones (source_size
    int32, text_mask uint8) exactly as Streaming's reader does, when a caller asks for them."""
    root = copy_ds(tiny_ds, tmp_path / "ds")
    ref = list(D.iter_samples(root))  # also decompresses the shards the fast path reads
    cols = ["latent", "label", "caption", "bucket", "source_size", "text", "text_mask"]
    ds = D.build_dataset(root, batch_size=4, shuffle=False, columns=cols)
    for sid in random.sample(range(len(ref)), len(ref)):
        got = ds.get_item(sid)
        assert set(got) == {*cols, "sample_id"} and got["sample_id"] == sid
        assert got["caption"] == ref[sid]["caption"] and got["bucket"] == ref[sid]["bucket"]
        assert got["label"] == ref[sid]["label"]
        for c in ("latent", "source_size", "text", "text_mask"):
            assert got[c].dtype == ref[sid][c].dtype and np.array_equal(got[c], ref[sid][c]), c
    assert ds._ditperf_maps, "the fast reader was not used"


def test_truncated_decompressed_shard_is_a_data_error(tiny_ds: Path, tmp_path: Path) -> None:
    """A decompressed ``.mds`` cut short after Streaming marked it local (disk full, a
    killed copy) is read by the open-once reader: the sample that runs past the end is a
    DataError naming the shard, not a numpy error or silently short data."""
    root = copy_ds(tiny_ds, tmp_path / "ds")
    list(D.iter_samples(root))
    shard = root / random.choice(["8x8", "8x12"]) / "shard.00000.mds"
    data = shard.read_bytes()
    shard.write_bytes(data[:-random.randint(1, 64)])
    ds = D.build_dataset(root, batch_size=4, shuffle=False)
    with pytest.raises(D.DataError, match=f"shard {shard} is truncated: sample 11 needs bytes"):
        for sid in range(24):
            ds.get_item(sid)


def test_class_count_and_schema_version_checks(tmp_path: Path) -> None:
    """A class dataset with more classes than the model's label embedding is refused (labels
    past the table index out of range on the GPU); fewer or as many are fine. A schema file
    from a newer ditperf (version + 1) or of another format is refused, naming the file."""
    config = get_config("dit-s-2")
    for n, ok in ((config.num_classes + random.randint(1, 50), False), (config.num_classes, True),
                  (random.randint(1, config.num_classes - 1), True)):
        schema = D.DatasetSchema(conditioning="class", latent_channels=4, buckets=[D.Bucket(32, 32, 8)], num_classes=n)
        if ok:
            D.check_compatible(schema, config, tmp_path)
        else:
            with pytest.raises(D.DataError, match=f"column 'label' has {n} classes but model 'dit-s-2' has num_classes=1000"):
                D.check_compatible(schema, config, tmp_path)
    schema = D.DatasetSchema(conditioning="class", latent_channels=4, buckets=[D.Bucket(32, 32, 8)], num_classes=10)
    path = schema.save(tmp_path)
    doc = json.loads(path.read_text())
    assert D.DatasetSchema.load(tmp_path).buckets[0].name == "32x32"
    path.write_text(json.dumps(dict(doc, version=D.SCHEMA_VERSION + 1)))
    with pytest.raises(D.DataError, match=f"{path}: schema version {D.SCHEMA_VERSION + 1} is newer"):
        D.DatasetSchema.load(tmp_path)
    path.write_text(json.dumps(dict(doc, format="other")))
    with pytest.raises(D.DataError, match=f"{path}: not a ditperf dataset schema"):
        D.DatasetSchema.load(tmp_path)


# ----------------------------------------------------------------------------- encode


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 2-block AutoencoderKL (factor 2) and a 2-layer CLIP text model + word-level
    tokenizer, saved with save_pretrained and later loaded back by path like a real model."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(root / "vae")
    words = ["[PAD]", "[UNK]", "a", "red", "cat", "dog", "on", "the", "mat", "blue", "sky"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", model_max_length=12)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0))
    te.save_pretrained(root / "te")
    tok.save_pretrained(root / "te")
    return {"vae": root / "vae", "te": root / "te"}


def _images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        p.with_suffix(".txt").write_text("a red cat on the mat" if i % 2 else "blue sky")
        paths.append(p)
    return paths


def test_encode_images_and_read_back(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from ditperf.trainer import encode as E
    from transformers import AutoTokenizer, CLIPTextModel

    sizes = [(32, 32), (30, 40), (40, 30), (33, 35), (20, 64)]
    _images(tmp_path / "imgs", sizes)
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), text_encoder=str(tiny_encoders["te"]), resolution=32,
                           chunk_size=2, batch_size=2, progress=False)
    schema = E.encode_dataset(tmp_path / "imgs", tmp_path / "out", opts)
    # default buckets at 32px with the factor-2 VAE (sides multiples of 8): 32x32, 24x40, 40x24
    assert {b.name: b.samples for b in schema.buckets} == {"16x16": 2, "12x20": 2, "20x12": 1}
    assert schema.conditioning == "text" and (schema.text_len, schema.text_dim) == (12, 32)
    D.verify_dataset(tmp_path / "out", mode="hashes")
    vae = AutoencoderKL.from_pretrained(tiny_encoders["vae"]).eval()
    te = CLIPTextModel.from_pretrained(tiny_encoders["te"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_encoders["te"])
    got = {s["caption"] + str(tuple(int(v) for v in s["source_size"])): s for s in D.iter_samples(tmp_path / "out")}
    assert len(got) == 5
    for i, (h, w) in enumerate(sizes):
        caption = "a red cat on the mat" if i % 2 else "blue sky"
        s = got[caption + str((h, w))]
        pixels, src, _ = E.load_image(str(tmp_path / "imgs" / f"im{i}.png"), [(32, 32), (24, 40), (40, 24)])
        assert src == (h, w) and s["bucket"] == f"{pixels.shape[0] // 2}x{pixels.shape[1] // 2}"
        with torch.no_grad():
            x = torch.from_numpy(np.array(pixels))[None].permute(0, 3, 1, 2).float() / 127.5 - 1
            ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            enc = tok([caption], padding="max_length", max_length=12, return_tensors="pt")
            hid = te(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
        np.testing.assert_allclose(s["latent"].astype(np.float32), ref[0].numpy(), atol=2e-3, rtol=2e-3)
        m = s["text_mask"].astype(bool)
        assert m.sum() == len(caption.split())
        np.testing.assert_allclose(s["text"][m].astype(np.float32), hid[torch.from_numpy(m)].numpy(),
                                   atol=5e-3, rtol=5e-3)
    # the result trains the tiny preset (channels, text width) and reads through the loader
    D.check_compatible(schema, get_config("tiny", text_dim=32), tmp_path / "out")
    batches = list(D.build_dataloader(D.build_dataset(tmp_path / "out", batch_size=1, shuffle=False),
                                      batch_size=1, num_workers=0))
    assert len(batches) == 5


def test_encode_resumes_after_bad_image(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    from ditperf.trainer import encode as E

    paths = _images(tmp_path / "imgs", [(32, 32)] * 5)
    good = paths[3].read_bytes()
    paths[3].write_bytes(b"not a png")  # chunk 1 (items 2, 3) fails
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), text_encoder=str(tiny_encoders["te"]), resolution=32,
                           chunk_size=2, batch_size=4, progress=False)
    out = tmp_path / "out"
    with pytest.raises(D.DataError, match=f"cannot read image {paths[3]}"):
        E.encode_dataset(tmp_path / "imgs", out, opts)
    done = out / "_encode" / "chunk-00000.json"
    part0 = out / "16x16" / "part-00000" / "shard.00000.mds.zstd"
    assert done.is_file() and part0.is_file() and not (out / "_encode" / "chunk-00001.json").exists()
    with pytest.raises(D.DataError, match="not a ditperf dataset"):
        D.DatasetSchema.load(out)  # unfinished encode is not readable as a dataset
    before = (part0.stat().st_mtime_ns, part0.read_bytes())
    paths[3].write_bytes(good)
    with pytest.raises(D.DataError, match="different settings.*resolution"):
        E.encode_dataset(tmp_path / "imgs", out, E.EncodeOptions(**{**opts.__dict__, "resolution": 64}))
    schema = E.encode_dataset(tmp_path / "imgs", out, opts)
    assert schema.total_samples == 5 and (part0.stat().st_mtime_ns, part0.read_bytes()) == before
    assert sorted(s["source_size"][0] for s in D.iter_samples(out)) == [32] * 5
    # a finished chunk whose shards were lost is encoded again, not silently dropped
    shutil.rmtree(out / "16x16" / "part-00001")
    schema = E.encode_dataset(tmp_path / "imgs", out, opts)
    assert schema.total_samples == 5 and (part0.stat().st_mtime_ns, part0.read_bytes()) == before
    assert D.verify_dataset(out, mode="hashes").total_samples == 5


def test_encode_skip_bad_list_survives_a_resume(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    from ditperf.trainer import encode as E

    paths = _images(tmp_path / "imgs", [(32, 32)] * 4)
    for bad in (paths[0], paths[3]):  # one in each chunk of 2
        bad.write_bytes(b"not an image")
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), text_encoder=str(tiny_encoders["te"]), resolution=32,
                           chunk_size=2, batch_size=4, progress=False, skip_bad=True)
    out = tmp_path / "out"
    assert E.encode_dataset(tmp_path / "imgs", out, opts).total_samples == 2
    listed = (out / "_encode" / "skipped.txt").read_text().split()
    assert listed == [str(paths[0]), str(paths[3])]
    (out / "_encode" / "chunk-00001.json").unlink()  # as if the first run stopped after chunk 0
    assert E.encode_dataset(tmp_path / "imgs", out, opts).total_samples == 2
    assert (out / "_encode" / "skipped.txt").read_text().split() == listed


def test_encode_jsonl_class_labels(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    from ditperf.trainer import encode as E

    paths = _images(tmp_path / "imgs", [(32, 32), (24, 40), (32, 32)])
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"imgs/{p.name}", "label": i % 2}) for i, p in enumerate(paths)))
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), labels="jsonl", buckets="32x32,24x40", progress=False)
    schema = E.encode_dataset(jsonl, tmp_path / "out", opts)
    assert schema.conditioning == "class" and schema.num_classes == 2
    assert sorted(s["label"] for s in D.iter_samples(tmp_path / "out")) == [0, 0, 1]
    with pytest.raises(D.DataError, match="multiples of the VAE factor 2"):
        E.encode_dataset(jsonl, tmp_path / "o2", E.EncodeOptions(vae=str(tiny_encoders["vae"]), labels="jsonl",
                                                                  buckets="31x31", progress=False))
    with pytest.raises(D.DataError, match="cannot load an AutoencoderKL"):
        E.encode_dataset(jsonl, tmp_path / "o3", E.EncodeOptions(vae=str(tmp_path / "missing"), labels="jsonl"))
    cats = tmp_path / "cats.jsonl"
    cats.write_text(json.dumps({"path": f"imgs/{paths[0].name}", "label": 0}) + "\n"
                    + json.dumps({"path": f"imgs/{paths[1].name}", "label": "cat"}) + "\n")
    with pytest.raises(D.DataError, match=f"{cats}:2: 'label' must be a whole number >= 0.*'cat'"):
        E.list_inputs(cats, "jsonl")


def test_load_image_covers_the_bucket_and_crops_the_centre(tmp_path: Path) -> None:
    """An image is scaled to *cover* its bucket (the short side fits, never squashed) and the
    overhang is cut evenly from both ends: a 32x48 image in a 32x32 bucket is its middle 32
    columns (no resampling at scale 1), a 48x32 one its middle rows, and a 64x96 one is first
    halved (bicubic) to 32x48."""
    from ditperf.trainer import encode as E
    from PIL import Image

    rng = np.random.default_rng(random.randrange(2**31))
    for h, w, want in ((32, 48, np.s_[:, 8:40]), (48, 32, np.s_[8:40, :])):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "im.png")
        pixels, src, k = E.load_image(str(tmp_path / "im.png"), [(32, 32)])
        assert src == (h, w) and k == 0 and np.array_equal(pixels, arr[want])
    big = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    big.save(tmp_path / "big.png")
    pixels, src, _ = E.load_image(str(tmp_path / "big.png"), [(32, 32)])
    ref = np.asarray(big.resize((48, 32), Image.Resampling.BICUBIC))[:, 8:40]
    assert src == (64, 96) and np.array_equal(pixels, ref)


def test_encode_jsonl_captions_and_an_empty_caption(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    """A JSONL input's ``caption`` fields (not the .txt files beside the images) reach the
    caption and text columns; an empty caption still gets one real token (text_mask[0] = 1
    with its hidden state kept), so cross-attention always has a key."""
    from ditperf.trainer import encode as E

    paths = _images(tmp_path / "imgs", [(32, 32)] * 3, seed=random.randrange(2**31))
    words = ["a", "red", "cat", "dog", "on", "the", "mat", "blue", "sky"]
    captions = [" ".join(random.choices(words, k=2)), "", " ".join(random.choices(words, k=random.randint(3, 10)))]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"imgs/{p.name}", "caption": c}) for p, c in zip(paths, captions)))
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), text_encoder=str(tiny_encoders["te"]), resolution=32,
                           progress=False)
    E.encode_dataset(jsonl, tmp_path / "out", opts)
    got = {s["caption"]: s for s in D.iter_samples(tmp_path / "out")}
    assert sorted(got) == sorted(captions)
    for c in captions:
        m = got[c]["text_mask"]
        assert m[0] == 1 and m.sum() == max(1, min(12, len(c.split()))), (c, m)
    empty = got[""]["text"].astype(np.float32)
    assert np.isfinite(empty).all() and np.abs(empty[0]).sum() > 0 and not empty[1:].any()


def test_encode_redoes_a_chunk_whose_shard_file_is_gone(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    """A finished chunk whose part folder lost only its shard file (index.json still there)
    is not intact: it is encoded again instead of being listed in the bucket's index, and
    the other chunk's shard is left as it was."""
    from ditperf.trainer import encode as E

    _images(tmp_path / "imgs", [(32, 32)] * 4, seed=random.randrange(2**31))
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), text_encoder=str(tiny_encoders["te"]), resolution=32,
                           chunk_size=2, batch_size=2, progress=False)
    out = tmp_path / "out"
    E.encode_dataset(tmp_path / "imgs", out, opts)
    lost = random.randrange(2)
    kept = out / "16x16" / f"part-{1 - lost:05d}" / "shard.00000.mds.zstd"
    before = (kept.stat().st_mtime_ns, kept.read_bytes())
    gone = out / "16x16" / f"part-{lost:05d}" / "shard.00000.mds.zstd"
    gone.unlink()
    assert E.encode_dataset(tmp_path / "imgs", out, opts).total_samples == 4
    assert gone.is_file() and (kept.stat().st_mtime_ns, kept.read_bytes()) == before
    assert D.verify_dataset(out, mode="hashes").total_samples == 4


def test_encode_refuses_a_resume_with_other_captions_or_seed(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    """The plan of an encode covers the captions (edited .txt files would mix old and new
    text embeddings) and the seed of ``--latent sample`` (other noise draws): a rerun with
    either changed is refused, naming what differs."""
    from ditperf.trainer import encode as E

    paths = _images(tmp_path / "imgs", [(32, 32)] * 3, seed=random.randrange(2**31))
    seed = random.randrange(2**31)
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), text_encoder=str(tiny_encoders["te"]), resolution=32,
                           chunk_size=2, latent="sample", seed=seed, progress=False)
    out = tmp_path / "out"
    E.encode_dataset(tmp_path / "imgs", out, opts)
    with pytest.raises(D.DataError, match=r"different settings \(seed differ\)"):
        E.encode_dataset(tmp_path / "imgs", out, E.EncodeOptions(**{**opts.__dict__, "seed": seed + 1}))
    txt = random.choice(paths).with_suffix(".txt")
    txt.write_text(txt.read_text() + " dog")
    with pytest.raises(D.DataError, match=r"different settings \(inputs differ\)"):
        E.encode_dataset(tmp_path / "imgs", out, opts)


def _labelled_jsonl(tmp_path: Path, n: int) -> tuple[Path, list[Path]]:
    """``n`` random 32x32 images and a JSONL listing them with labels 0..n-1 (sorted order)."""
    paths = _images(tmp_path / "imgs", [(32, 32)] * n, seed=random.randrange(2**31))
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"imgs/{p.name}", "label": i}) for i, p in enumerate(paths)))
    return jsonl, paths


def test_encode_applies_the_vae_shift_and_scaling_factors(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    """``latent = (mean - shift_factor) * scaling_factor`` with both factors from the VAE's
    config (SD3/Flux VAEs have a shift; the SD VAE has none, so only a VAE with one tells
    ``(z - shift) * scale`` from ``z * scale - shift``); the schema records both."""
    from diffusers import AutoencoderKL
    from ditperf.trainer import encode as E

    vae_dir = shutil.copytree(tiny_encoders["vae"], tmp_path / "vae")
    cfg = json.loads((vae_dir / "config.json").read_text())
    shift, scale = random.uniform(0.2, 1.0), random.uniform(0.3, 2.0)
    (vae_dir / "config.json").write_text(json.dumps(dict(cfg, shift_factor=shift, scaling_factor=scale)))
    jsonl, paths = _labelled_jsonl(tmp_path, 2)
    opts = E.EncodeOptions(vae=str(vae_dir), labels="jsonl", buckets="32x32", progress=False)
    schema = E.encode_dataset(jsonl, tmp_path / "out", opts)
    assert (schema.source["shift_factor"], schema.source["scaling_factor"]) == (shift, scale)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    got = {s["label"]: s["latent"] for s in D.iter_samples(tmp_path / "out")}
    for i, p in enumerate(paths):
        pixels, _, _ = E.load_image(str(p), [(32, 32)])
        with torch.no_grad():
            x = torch.from_numpy(np.array(pixels))[None].permute(0, 3, 1, 2).float() / 127.5 - 1
            ref = (vae.encode(x).latent_dist.mean[0] - shift) * scale
        np.testing.assert_allclose(got[i].astype(np.float32), ref.numpy(), atol=3e-3, rtol=3e-3)


def test_encode_latent_sample_noise_follows_the_image_index(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    """``--latent sample``: z = mean + std * n, n drawn from (seed, index of the image in the
    sorted inputs), so an image gets the same draw whatever the batch size or chunking;
    checked against draws written out, at batch sizes 1 and 3."""
    from diffusers import AutoencoderKL
    from ditperf.trainer import encode as E

    jsonl, paths = _labelled_jsonl(tmp_path, 3)
    seed = random.randrange(2**31)
    got = {}
    for bs in (1, 3):
        opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), labels="jsonl", buckets="32x32", latent="sample",
                               seed=seed, batch_size=bs, progress=False)
        E.encode_dataset(jsonl, tmp_path / f"out{bs}", opts)
        got[bs] = {s["label"]: s["latent"].astype(np.float32) for s in D.iter_samples(tmp_path / f"out{bs}")}
    vae = AutoencoderKL.from_pretrained(tiny_encoders["vae"]).eval()
    for i, p in enumerate(paths):
        pixels, _, _ = E.load_image(str(p), [(32, 32)])
        with torch.no_grad():
            x = torch.from_numpy(np.array(pixels))[None].permute(0, 3, 1, 2).float() / 127.5 - 1
            dist = vae.encode(x).latent_dist
        n = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(D.mix_seed(seed, i)))
        ref = ((dist.mean[0] + dist.std[0] * n) * vae.config.scaling_factor).numpy()
        mean = (dist.mean[0] * vae.config.scaling_factor).numpy()
        for bs in (1, 3):
            np.testing.assert_allclose(got[bs][i], ref, atol=3e-3, rtol=3e-3)
        assert np.abs(got[1][i] - mean).max() > 1e-2  # noise was added


def test_encode_folder_labels(tiny_encoders: dict[str, Path], tmp_path: Path) -> None:
    """``--labels folders``: the class of an image is the index of its sub-folder among the
    sorted class folder names (0-based, recorded in the schema); images straight in the
    input folder have no class to take and are refused."""
    from collections import Counter

    from ditperf.trainer import encode as E

    classes = sorted(random.sample(["cat", "dog", "fox", "owl", "yak"], 3))
    counts = random.sample([1, 2, 3], 3)
    for c, n in zip(classes, counts):
        _images(tmp_path / "imgs" / c, [(32, 32)] * n, seed=random.randrange(2**31))
    opts = E.EncodeOptions(vae=str(tiny_encoders["vae"]), labels="folders", buckets="32x32", progress=False)
    schema = E.encode_dataset(tmp_path / "imgs", tmp_path / "out", opts)
    assert schema.num_classes == 3 and schema.source["classes"] == classes
    labels = Counter(s["label"] for s in D.iter_samples(tmp_path / "out"))
    assert labels == {i: n for i, n in enumerate(counts)}
    _images(tmp_path / "flat", [(32, 32)] * 2)
    with pytest.raises(D.DataError, match="--labels folders: .*flat has no class subfolders"):
        E.list_inputs(tmp_path / "flat", "folders")


def test_cli_synth_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ditperf.cli.main import main

    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--preset", "tiny", "--num", "8",
                 "--buckets", "8x8", "--quiet"]) == 0
    assert "wrote 8 samples" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "s")]) == 0
    assert "OK (hashes) - 8 samples" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num", "8", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
