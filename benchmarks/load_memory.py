"""Host memory of loading a reference checkpoint into a sharded model: the whole-checkpoint path
against the sliced one, side by side.

Run ``python -m benchmarks.load_memory [--params 1e9] [--world 2] [--keep DIR]``. Results and their
reading: ``benchmarks/RESULTS.md``.

A random Qwen2.5-VL-shaped checkpoint of about ``--params`` parameters (vocabulary 32000, text width
2048 with MLP 5632 and 16 / 2 heads, the layer count chosen to reach the size, a 4-block vision
tower of width 1024) is written the way transformers writes one: bf16, sharded into about five
``model-0000i-of-0000n.safetensors`` files with their ``model.safetensors.index.json``. Then, for
each path, ``--world`` fresh gloo processes (one thread each) build the model on the meta device,
shard it with FSDP2 over ``dp_shard=world`` (the family's parallel plan, as training builds it),
materialise their shards and load the checkpoint:

* old: every rank reads the whole checkpoint into memory (``load_hf_state_dict``), renames it and
  copies each tensor, cast to fp32, into its shard (``copy_full_into``);
* new: ``load_weights_into``: each rank reads only the slices its shards hold from the memory-mapped
  files, one tensor at a time, cast as they arrive.

Safetensors files are memory-mapped by both paths, so the old path's bf16 copy of the checkpoint
lives mostly in the page cache, not in anonymous memory; the table also gives the checkpoint bytes
each rank read (every byte on the old path, its shards' on the new one). Each rank samples ``RssAnon`` (anonymous resident memory, from ``/proc/self/status``: the pages of a
memory-mapped file do not count, they are the page cache's) every 2 ms from before materialising to
the end of the load; the peak growth over that baseline includes the rank's own fp32 shard. The
target is ``1.3 x (the rank's fp32 shard + the largest single tensor in fp32)``. Both paths must give
the same parameters (a checksum per rank). The last line is ``load peak / target: X.XX`` for the new
path (the worst rank; <= 1.00 passes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.machine import commit, cpu_name
from openspeed.errors import ConfigError, OpenSpeedError

GiB = 2**30
TARGET_FACTOR = 1.3
SAMPLE_S = 0.002


def rss_anon() -> int:
    """This process's anonymous resident bytes (``RssAnon``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status (a Linux kernel >= 4.5 is needed)")


class PeakSampler:
    """The highest ``RssAnon`` seen by a background thread while running."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(SAMPLE_S)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def model_config(params: float):
    """A Qwen2.5-VL config of about ``params`` parameters (the decoder's depth sets the size)."""
    from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig
    from openspeed.models.qwen2_5_vl.config import TextConfig, VisionConfig

    def build(layers: int):
        return Qwen2_5_VLConfig(
            vision=VisionConfig(depth=4, hidden_size=1024, intermediate_size=2816, num_heads=16, patch_size=14,
                                spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                                fullatt_block_indexes=(3,)),
            text=TextConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=2, mrope_section=(16, 24, 24),
                            max_position_embeddings=4096),
            image_token_id=31998, video_token_id=31999, vision_start_token_id=31996,
        )

    def count(config) -> int:
        from openspeed.models.registry import get_model_spec

        with torch.device("meta"):
            return sum(p.numel() for p in get_model_spec("qwen2_5_vl").build(config).parameters())

    per_layer = count(build(2)) - count(build(1))
    layers = max(1, round((params - (count(build(1)) - per_layer)) / per_layer))
    return build(layers), count(build(layers))


def write_checkpoint(out: Path, config, shards: int = 5) -> tuple[int, int]:
    """A random bf16 checkpoint of ``config`` in transformers' sharded layout, written file by file;
    returns (parameter count, largest tensor's element count)."""
    from safetensors.torch import save_file

    from openspeed.models.registry import get_model_spec

    spec = get_model_spec("qwen2_5_vl")
    with torch.device("meta"):
        model = spec.build(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    hf_names = spec.native_to_hf(dict(zip(shapes, shapes)), config)  # hf name -> native name (a rename)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    budget = total / shards
    gen = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for hf_name, native in hf_names.items():
        if groups[-1] and size >= budget:
            groups.append([])
            size = 0
        groups[-1].append(hf_name)
        size += torch.Size(shapes[native]).numel()
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[hf_names[n]], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(spec.config_to_hf(config)))
    return total, max(torch.Size(s).numel() for s in shapes.values())


def _load_old(parts, spec, config, path: str) -> None:
    from openspeed.models.init import copy_full_into
    from openspeed.models.loading import load_hf_state_dict

    native = spec.hf_to_native(load_hf_state_dict(path), config)
    for part in parts:
        for name, param in part.named_parameters():
            copy_full_into(param, native[name].float())


def _worker(rank: int, world: int, port: int, path: str, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from openspeed.config import ParallelConfig, RunConfig
    from openspeed.distributed.mesh import build_mesh
    from openspeed.models.loading import model_config_from_run
    from openspeed.training.model_setup import load_weights_into

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = RunConfig()
        cfg.model.path = path
        sizes = {"pp": 1, "dp_replicate": 1, "dp_shard": world, "cp": 1, "tp": 1}
        cfg.parallel = ParallelConfig(**sizes)
        spec, config = model_config_from_run(cfg)
        dims = build_mesh(sizes, "cpu")
        with torch.device("meta"):
            model = spec.build(config)
        spec.parallelize(model, dims, cfg)
        dist.barrier()
        shard_bytes = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in model.parameters())
        largest = max(p.numel() for p in model.parameters()) * 4
        baseline = rss_anon()
        start = time.perf_counter()
        with PeakSampler() as sampler:
            model.to_empty(device="cpu")
            spec.reset_buffers(model, torch.device("cpu"))
            if method == "old":
                _load_old([model], spec, config, path)
                read = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            else:
                read = load_weights_into([model], spec, config, path)
        seconds = time.perf_counter() - start
        checksum = sum(float((p.to_local() if isinstance(p, DTensor) else p).detach().double().sum())
                       for p in model.parameters())
        Path(out, f"{method}{rank}.json").write_text(json.dumps({
            "peak": sampler.peak - baseline, "target": TARGET_FACTOR * (shard_bytes + largest),
            "shard": shard_bytes, "largest": largest, "seconds": seconds, "read": read, "checksum": checksum}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_path(path: str, method: str, world: int, out: str) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, path, method, out), nprocs=world, start_method="spawn")
    return [json.loads(Path(out, f"{method}{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9, help="checkpoint size in parameters")
    parser.add_argument("--world", type=int, default=2, help="ranks (dp_shard)")
    parser.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    args = parser.parse_args(argv)
    if args.params < 1e7:
        raise ConfigError(f"--params: at least 1e7, got {args.params:g}")
    if args.world < 1:
        raise ConfigError(f"--world: must be positive, got {args.world}")
    rss_anon()
    os.environ["OMP_NUM_THREADS"] = "1"
    command = " ".join(["python -m benchmarks.load_memory", *(sys.argv[1:] if argv is None else argv)])
    print("# Checkpoint loading memory: whole checkpoint per rank vs each rank's slices\n")
    print(f"`{command}` on {cpu_name()}, torch {torch.__version__}, commit {commit()}", flush=True)
    tmp = tempfile.mkdtemp(prefix="openspeed_load_memory_") if args.keep is None else args.keep
    try:
        config, total = model_config(args.params)
        path = Path(tmp) / "checkpoint"
        start = time.perf_counter()
        _, largest = write_checkpoint(path, config)
        files = sorted(path.glob("*.safetensors"))
        print(f"checkpoint: {total / 1e9:.2f}B parameters ({config.text.num_hidden_layers} decoder layers), bf16, "
              f"{len(files)} files, {sum(f.stat().st_size for f in files) / GiB:.2f} GiB, written in "
              f"{time.perf_counter() - start:.0f} s; largest tensor {largest / 1e6:.1f}M elements", flush=True)
        results = {}
        for method in ("old", "new"):
            results[method] = run_path(str(path), method, args.world, tmp)
        print(f"\ndp_shard={args.world}; growth of RssAnon from before materialising to the end of the load; target "
              f"= {TARGET_FACTOR} x (the rank's fp32 shard + the largest tensor in fp32)\n")
        print("| path | rank | checkpoint GiB read | fp32 shard GiB | peak growth GiB | target GiB | peak / target | load s |")
        print("|---|---|---|---|---|---|---|---|")
        for method, rows in results.items():
            for rank, row in enumerate(rows):
                print(f"| {method} | {rank} | {row['read'] / GiB:.2f} | {row['shard'] / GiB:.2f} | {row['peak'] / GiB:.2f} | "
                      f"{row['target'] / GiB:.2f} | {row['peak'] / row['target']:.2f} | {row['seconds']:.1f} |")
        for rank, (old, new) in enumerate(zip(results["old"], results["new"])):
            if abs(old["checksum"] - new["checksum"]) > 1e-6 * max(1.0, abs(old["checksum"])):
                raise SystemExit(f"error: rank {rank} loaded different weights by the two paths "
                                 f"(checksums {old['checksum']} and {new['checksum']})")
        print("\nboth paths load the same weights (per-rank checksums equal)")
        print(f"load peak / target: {max(r['peak'] / r['target'] for r in results['new']):.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except OpenSpeedError as exc:
        raise SystemExit(f"error: {exc}") from None
