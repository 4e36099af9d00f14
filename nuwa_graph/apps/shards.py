"""Data-parallel `nuwa-graph eval`: split the samples into shards, evaluate each shard in its
own process (a rank of `torchrun` / `accelerate launch`, or a job of `--shard I/N`), merge.

    shard = Shard.from_env() or parse_shard("0/4")      # which part this process evaluates
    part = shard.take(tasks)                             # contiguous block of every task
    result = evaluate(adapter, runs, [t for t in part if t.samples], raw=True)
    write_shard(shard_payload(result, tasks, part, shard, grid, labels), out_dir)
    merged, grid = merge(read_shards([out_dir]))         # the single-process result dict

Under torchrun/accelerate every rank writes its shard, the ranks meet at a barrier (`Group`:
torch.distributed over gloo, CPU only) and rank 0 merges; with `--shard I/N` each job writes its
shard and `nuwa-graph merge OUT` merges them later.

Shard i of N holds samples [i*n//N, (i+1)*n//N) of each task, so concatenating the shards in
order gives the single-process order. Every number a single process reports is recomputed
from the shards' unrounded sums and per-sample scores (`evaluate(..., raw=True)`), so accuracy,
IoU, tokens per layer and full tokens are identical; prefill ms is the median over all shards'
batches (a timing: it differs between any two runs).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..flops import mean_flops
from .efficiency import summarize_costs
from .errors import EvalError
from .eval_batches import turn_medians
from .evaluate import add_relative, analyse, full_mean, reference_index
from .scoring import summarize
from .tasks import Task

SHARD_DIR = "shards"
FORMAT = 1


@dataclass(frozen=True)
class Shard:
    index: int       # 0-based
    count: int
    launched: bool = False   # True under torchrun/accelerate (ranks meet at a barrier)
    local_rank: int = 0

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}.json"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Shard | None:
        """The rank of a `torchrun` / `accelerate launch` process (RANK, WORLD_SIZE, LOCAL_RANK);
        None when not launched with more than one process."""
        env = dict(os.environ if env is None else env)
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise EvalError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got RANK={env.get('RANK')!r} "
                            f"WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise EvalError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
        return cls(rank, world, launched=True, local_rank=local)

    def bounds(self, n: int) -> tuple[int, int]:
        return self.index * n // self.count, (self.index + 1) * n // self.count

    def take(self, tasks: list[Task]) -> list[Task]:
        """This shard's contiguous block of every task (possibly empty)."""
        out = []
        for t in tasks:
            lo, hi = self.bounds(len(t.samples))
            out.append(replace(t, samples=t.samples[lo:hi]))
        return out


def parse_shard(text: str) -> Shard:
    """'I/N' (I is 0-based, 0 <= I < N) -> Shard, or a clear --shard error."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise EvalError(f"--shard {text!r}: expected I/N with integers, e.g. 0/4 (I counts from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise EvalError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (I counts from 0: 0/4 .. 3/4)")
    return Shard(i, n)


def device_for(shard: Shard | None, device: str) -> str:
    """Under torchrun/accelerate, `--device auto` (with CUDA there) and `--device cuda` put rank r on
    cuda:LOCAL_RANK (modulo the GPUs it sees) and make that the current CUDA device, so every rank
    has its own GPU (not all of them GPU 0); an explicit `cuda:N` or `cpu` is kept."""
    if shard is None or not shard.launched or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        dev = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(dev)
        return dev
    return device


def check_launch(shard: Shard | None, device_map: str | None) -> None:
    """A device_map spreads ONE copy of the model over every GPU: under torchrun/accelerate each of
    the WORLD_SIZE ranks would spread its own copy over all of them. Refused with what to do."""
    if shard is not None and shard.launched and device_map is not None:
        raise EvalError(f"--device-map {device_map} with WORLD_SIZE={shard.count}: each rank would spread its own "
                        f"copy of the model over every GPU. Under torchrun/accelerate use --device cuda (rank r runs "
                        f"on cuda:LOCAL_RANK); for a model too large for one GPU run a single process with "
                        f"--device-map (or split the data with --shard I/N, one job per group of GPUs)")


# --- shard files ---------------------------------------------------------------------------------
def shard_payload(result: dict[str, Any] | None, tasks: list[Task], part: list[Task], shard: Shard,
                  grid: dict[str, list[Any]], labels: list[str]) -> dict[str, Any]:
    """What a shard writes: its result (with `raw`, or None when it got no sample) and where its
    samples lie in each task."""
    ranges = {}
    for t, _p in zip(tasks, part):
        lo, hi = shard.bounds(len(t.samples))
        ranges[t.kind] = [lo, hi]
    return {"format": FORMAT, "shard": shard.index, "count": shard.count, "grid": grid, "labels": labels,
            "data": [{"task": t.kind, "source": t.source, "n": len(t.samples),
                      "skipped_bad_records": t.skipped} for t in tasks],
            "ranges": ranges, "result": result}


def write_shard(payload: dict[str, Any], out_dir: str | Path) -> Path:
    """OUT/shards/shard-I-of-N.json, written to a temporary name and renamed (never half a file)."""
    d = Path(out_dir) / SHARD_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"shard-{payload['shard']}-of-{payload['count']}.json"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, default=str) + "\n")
    os.replace(tmp, path)
    return path


def shard_files(source: str | Path) -> list[Path]:
    """The shard files of an output folder (OUT or OUT/shards), or the file itself."""
    p = Path(source)
    if p.is_file():
        return [p]
    for d in (p / SHARD_DIR, p):
        found = sorted(d.glob("shard-*-of-*.json"))
        if found:
            return found
    raise EvalError(f"{source}: no shard files (shard-I-of-N.json) there or in {p / SHARD_DIR}; run "
                    f"`nuwa-graph eval ... --shard I/N -o {source}` for every I first")


def read_shards(sources: list[str | Path]) -> list[dict[str, Any]]:
    """Every shard of one sharded evaluation, in order; a missing, duplicate or mismatched shard
    is a clear error."""
    files: list[Path] = []
    for s in sources:
        files += shard_files(s)
    shards: dict[int, dict] = {}
    count = None
    for f in files:
        try:
            d = json.loads(Path(f).read_text())
        except (OSError, ValueError) as exc:
            raise EvalError(f"shard file {f} could not be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EvalError(f"shard file {f} is not a nuwa-graph shard file (format {FORMAT})")
        if count is not None and d["count"] != count:
            raise EvalError(f"shard file {f} is one of {d['count']} shards, the others of {count}; merge the shards "
                            f"of one split only")
        count = d["count"]
        if d["shard"] in shards:
            raise EvalError(f"shard {d['shard']}/{count} is given twice ({f})")
        shards[d["shard"]] = d
    if count is None:
        raise EvalError("no shard files to merge")
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise EvalError(f"shards {', '.join(f'{i}/{count}' for i in missing)} are missing; run them "
                        f"(`nuwa-graph eval ... --shard I/{count}`) before merging")
    ordered = [shards[i] for i in range(count)]
    first = ordered[0]
    for d in ordered[1:]:
        for key in ("data", "labels", "grid"):
            if d[key] != first[key]:
                raise EvalError(f"shard {d['shard']}/{count} was run with other {key} than shard 0 "
                                f"({d[key]!r} vs {first[key]!r}); rerun it with the same command")
    return ordered


# --- merge ----------------------------------------------------------------------------------------
def merge(shards: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The result dict a single process would have produced, and the swept grid."""
    first = shards[0]
    results = [s["result"] for s in shards if s["result"] is not None]
    if not results:
        raise EvalError("no shard evaluated any sample")
    base = results[0]
    for r in results[1:]:
        if r["settings"] != base["settings"] or r["model"] != base["model"]:
            raise EvalError("the shards were run with different models or settings; rerun them with one command")
    kinds = [d["task"] for d in first["data"]]
    first_task = kinds[0]
    merged_runs = []
    for i, label in enumerate(first["labels"]):
        parts = [r["results"][i] for r in results]
        for p in parts:
            if p["label"] != label:
                raise EvalError(f"shard runs differ: {p['label']!r} where {label!r} was expected")
        run = {k: v for k, v in parts[0].items()
               if k not in ("raw", "tasks", "predictions", "sample_kept", "sample_image", "sample_prompt", "grid", "views")}
        # the kept-token sample is the first sample of the first task: the shard whose block starts it
        for s, p in zip([s for s in shards if s["result"] is not None], parts):
            lo, hi = s["ranges"][first_task]
            if lo == 0 and hi > 0 and "sample_kept" in p:
                for k in ("sample_kept", "sample_image", "sample_prompt", "grid", "views"):
                    if k in p:
                        run[k] = p[k]
                break
        run["tasks"] = {}
        run["predictions"] = []
        # the task keys as one process has them (a dialog file gives one per turn mode: dialog:reuse, ...)
        keys = [k for k in parts[0]["raw"]["scores"] if k.split(":")[0] in kinds] or kinds
        for kind in keys:
            scores = [sc for p in parts for sc in p["raw"]["scores"].get(kind, [])]
            run["tasks"][kind] = summarize(kind.split("#")[0], scores)
            turns: dict[str, list[float]] = {}
            for p in parts:  # a dialog task's prefill per turn: the median over all shards' calls
                for t, ms in p["raw"].get("turn_prefill", {}).get(kind, {}).items():
                    turns.setdefault(t, []).extend(ms)
            if turns:
                run["tasks"][kind]["prefill_ms_per_turn"] = turn_medians(turns)
        for kind in keys:  # single-process order: task by task, shard by shard
            run["predictions"] += [pr for p in parts for pr in p["predictions"] if pr["task"] == kind]
        accs = [t["accuracy"] for t in run["tasks"].values()]
        run["accuracy"] = sum(accs) / len(accs)
        n = sum(p["raw"]["n"] for p in parts)
        width = max(len(p["raw"]["per_layer_sum"]) for p in parts)
        per_layer = [sum(p["raw"]["per_layer_sum"][L] for p in parts if L < len(p["raw"]["per_layer_sum"]))
                     for L in range(width)]
        run["visual_tokens_per_layer"] = [round(v / n, 3) for v in per_layer] if n else []
        run["visual_tokens_avg"] = round(sum(p["raw"]["avg_sum"] for p in parts) / n, 3) if n else 0.0
        run["visual_tokens_full"] = full_mean(sum(p["raw"]["full_sum"] for p in parts), n)
        prefill = [ms for p in parts for ms in p["raw"]["prefill_ms"]]
        run["prefill_ms_median"] = round(statistics.median(prefill), 3) if prefill else 0.0
        run["flops"] = mean_flops([f for p in parts for f in p["raw"].get("flops", [])])
        run["efficiency"] = summarize_costs([c for p in parts for c in p["raw"].get("costs", [])], run["flops"],
                                            [c for p in parts for c in p["raw"].get("neutral", [])])
        order = [k for k in parts[0] if k != "raw"]   # a single process's key order
        merged_runs.append({**{k: run[k] for k in order if k in run}, **run})
    add_relative(merged_runs)
    out = dict(base)
    out["data"] = first["data"]
    out["settings"] = {**base["settings"], "shards": len(shards)}
    out["reference"] = merged_runs[reference_index(merged_runs)]["label"]
    out["results"] = merged_runs
    analyse(out, out["settings"].get("difficulty"))  # loyalty and the hard/easy split, from the merged predictions
    return out, first["grid"]


class Group:
    """The ranks of a torchrun/accelerate launch, for waiting on each other: torch.distributed
    over gloo (CPU only: no GPU memory, no NCCL). Made from the launcher's MASTER_ADDR /
    MASTER_PORT unless a process group exists already; a no-op for a single process or --shard.

        with Group(shard) as group:
            ...            # rank 0 writes the sample set
            group.barrier()
    """

    def __init__(self, shard: Shard | None):
        self.shard = shard
        self.active = bool(shard and shard.launched)
        self._made = False

    def __enter__(self) -> Group:
        if not self.active:
            return self
        import datetime

        import torch.distributed as dist

        if not dist.is_available():
            raise EvalError("torch.distributed is not available in this torch build; run each part with "
                            "--shard I/N and `nuwa-graph merge` instead")
        if not dist.is_initialized():
            if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
                raise EvalError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun or "
                                "accelerate launch, or use --shard I/N and `nuwa-graph merge`")
            assert self.shard is not None
            dist.init_process_group("gloo", rank=self.shard.index, world_size=self.shard.count,
                                    timeout=datetime.timedelta(hours=48))
            self._made = True
        return self

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def __exit__(self, *exc) -> None:
        if self._made:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._made = False


__all__ = ["Group", "Shard", "check_launch", "device_for", "merge", "parse_shard", "read_shards", "shard_files", "shard_payload",
           "write_shard"]
