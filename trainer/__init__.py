"""ditperf.trainer: train latent DiTs with MosaicML Composer on MosaicML Streaming shards.

The VAE latents and text embeddings are computed once and stored in MDS shards; training then
reads only latents (+ embeddings), so the GPU never runs the VAE or the text encoder.

Datasets
--------
::

    ditperf data synth  --out DIR --preset tiny --num 256 [--buckets 8x8,8x12]
    ditperf data encode IMAGES_DIR|list.jsonl --out DIR --vae NAME_OR_PATH \\
        --text-encoder NAME_OR_PATH [--resolution 256] [--buckets 256x256,224x288,...]
    ditperf data verify DIR

A dataset folder holds ``ditperf_schema.json`` (conditioning, latent channels, text L x D,
buckets, provenance) and one MDS dataset per aspect-ratio bucket (``DIR/<H>x<W>/``, latent
size), written by ``MDSWriter`` with zstd compression and xxh64 hashes. Columns: ``latent``
(``ndarray:float16:C,H,W``), ``label`` (int, -1 if none), ``caption``, ``source_size``
(int32 (h, w)), ``bucket`` and, for text datasets, ``text`` (``ndarray:float16:L,D``) and
``text_mask`` (uint8 L). ``encode`` stores ``(posterior mean - shift_factor) *
scaling_factor`` of a diffusers ``AutoencoderKL`` (``--latent sample`` for a seeded sample)
and the text encoder's last hidden state; it is resumable (chunks of ``--chunk-size`` images,
each finished chunk marked in ``DIR/_encode/``; a rerun skips them). Training checks the
schema against the model (channels, patch divisibility, text width, conditioning) and the
shards' sizes and hashes before starting (``data.verify``), with errors naming the file or
column. Note: Streaming decompresses each ``.mds.zstd`` shard of a local dataset to ``.mds``
next to it on first read.

Reading
-------
One Streaming ``Stream`` per bucket in one ``StreamingDataset`` with
``batching_method="per_stream"``: every global batch comes from a single bucket (shapes never
mix), the shuffle is seeded (``data.shuffle_seed``, default ``seed``) and the position is saved
in Composer checkpoints, so resumption is exact. Each worker opens a shard once and reads a
sample with one pread (Streaming's own reader opens the file for every sample).
Edit configs (``model.edit=true``) get their masks built in the data workers by
``make_edit_batch`` with a generator seeded by (seed, epoch, sample id).

Training
--------
::

    ditperf train tiny-cpu data.local=DIR [key=value ...]     # packaged config, or a YAML path
    ditperf train dit-xl-2 data.local=DIR save_folder=ckpt save_interval=1000ba
    ditperf train dit-xl-2 data.local=DIR save_folder=ckpt autoresume=true     # resume
    ditperf train --list-keys                                  # every key and its default

Composer ``Trainer`` with a ``ComposerModel`` around the DiT (flow-matching loss; analytic
``flops_per_batch`` so ``SpeedMonitor`` reports MFU), ``DecoupledAdamW``, warmup + cosine
schedule, ``EMA`` and ``GradientClipping`` algorithms, bf16 autocast on GPU (fp32 on CPU),
conditioning dropout for classifier-free guidance, checkpoints in Composer's format
(``ep{epoch}-ba{batch}-rank{rank}.pt``, ``latest-rank{rank}.pt``), ``load_path`` /
``autoresume``, ``stop_at`` (stop cleanly with a checkpoint, keeping ``max_duration``'s
schedule), ``model.backend: triton|torch``. Callbacks: ``SpeedMonitor``, ``LRMonitor``,
``MemoryMonitor`` (GPU), ditperf's NVML ``PowerCallback`` (``callbacks.power``; auto = on a
GPU). A NaN/inf loss stops the run before the step is applied or saved: the last checkpoint
(and ``latest``) stays the last good one; exit code 3. At the end a summary (loss, img/s and
MFU as logged by SpeedMonitor) is printed and written to ``<save_folder>/train_summary.json``.

Exact resume: every random draw of a step (timesteps, noise, conditioning dropout) comes
from a generator seeded by (seed, global batch index, rank, microbatch), data order from
Streaming's state in the checkpoint: 8 batches straight and 4 + resume-in-a-new-process + 4
end with bit-identical weights and EMA on CPU.

Several GPUs / nodes
--------------------
::

    composer -n 8 -m ditperf.trainer dit-xl-2 data.local=DIR save_folder=ckpt
    composer -n 8 -m ditperf.trainer t2i-1b data.local=DIR       # FSDP (parallelism_config)

Composer's launcher starts one process per GPU (DDP by default; FSDP when the config has a
``parallelism_config: {fsdp: {...}}`` section, with one wrap and activation-checkpointing unit
per DiT block). ``fsdp_version`` (auto | 1 | 2; auto = ``$FSDP_VERSION``, else 1 on GPUs and 2
on CPU, where v1 cannot run) picks Composer's FSDP or FSDP2; ``composer -n 2`` on CPU runs the
t2i-1b section with FSDP2 over gloo. EMA is Composer's, subclassed (``ditperf.trainer.ema.EMA``) so that
checkpoints of FSDP2-sharded EMA weights hold whole tensors (resume is exact).
``global_train_batch_size`` is split evenly across ranks and Streaming gives each rank its own
samples. With a remote dataset set ``data.remote=s3://...`` and ``data.local`` to a local
cache folder.
"""

__all__: list[str] = []
