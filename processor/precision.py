"""`precision: auto`: the autocast precision a run trains in, chosen once, before its first step.

On CUDA the choice needs no measurement: bf16 where the GPU supports it, else fp16 (the trainer's GradScaler is on
for fp16). On the CPU it does: whether bf16 pays depends on the instructions (AVX-512 BF16, AMX) and on the model's
shapes (small matrix products gain little and still pay for the casts), so the run's own model is timed, a few
steps of the trainer's own step function (forward, backward, optimizer) in fp32 and in bf16 on a synthetic batch
of the run's shapes, and bf16 is taken only when it is faster by MARGIN (fp32 is exact). The figures are cached per CPU model, its bf16/fp16 flags, torch version,
thread count and model shape, so a second run of the same preset on the same machine starts without timing.

The run records its choice (configs.yaml says `precision: <chosen>`, its provenance says how it was chosen), and a
resumed run keeps it without timing again (`recorded_choice`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from processor.synthetic import training_batch
from processor.trainer import Trainer
from utils.config import Config
from utils.errors import UserError, short_repr
from utils.files import write_atomic
from utils.provenance import utc_now

logger = logging.getLogger("php.train")

# The CPU flags that decide what bf16 (and fp16) autocast runs on: AVX-512 BF16 dot products, AMX tiles.
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16")
TIMED = ("fp32", "bf16")
CHOSEN = ("fp32", "bf16", "fp16")
# bf16 must beat fp32 by this share: a tie is not worth the rounding.
MARGIN = 0.05
WARMUP_STEPS, TIMED_STEPS, BUDGET_S = 1, 3, 8.0
CACHE_ENV = "PHP_PRECISION_CACHE"
CACHE_VERSION = 1
# The key that says a JSON file is this project's cache, the one file PHP_PRECISION_CACHE may replace.
CACHE_MARKER = "php-retrieval precision cache"
# Far beyond any real cache (an entry is under 1 KB): a larger file is not read.
MAX_CACHE_BYTES = 16 * 2 ** 20


@dataclass(frozen=True)
class Choice:
    """What `auto` resolved to: `precision`, the median seconds per step that decided it (`timings`, by mode; empty
    when nothing was timed), whether they came from the cache, the seconds the choice took, and `source`: timed,
    cache, cuda, recorded (a resumed run's own), or fallback (timing failed; `note` says why)."""

    precision: str
    timings: Dict[str, float] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0
    source: str = "timed"
    note: str = ""

    def record(self) -> Dict[str, Any]:
        """The run's provenance entry `precision_choice`."""
        out = {"requested": "auto", "chosen": self.precision, **asdict(self)}
        del out["precision"]
        return out


def cpu_description() -> Dict[str, Any]:
    """{"model": the CPU's model name, "flags": {flag: True/False, None where unknown} for CPU_FLAGS}."""
    name, flags = "", None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and flags is None:
                    flags = set(value.split())
                if name and flags is not None:
                    break
    except OSError:
        pass  # not Linux: the name from platform, the flags unknown
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return {"model": name, "flags": {f: None if flags is None else f in flags for f in CPU_FLAGS}}


def describe_cpu(cpu: Optional[Dict[str, Any]] = None) -> str:
    """One line: 'AMD EPYC ... (avx512_bf16 present, amx_bf16 absent, avx512_fp16 absent)'."""
    cpu = cpu or cpu_description()
    words = {True: "present", False: "absent", None: "unknown"}
    return f"{cpu['model']} ({', '.join(f'{k} {words[v]}' for k, v in cpu['flags'].items())})"


def cache_path() -> str:
    """$PHP_PRECISION_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/php-retrieval/precision.json."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "php-retrieval", "precision.json")


def cache_key(cfg: Config, model: torch.nn.Module, batch_size: int) -> Dict[str, Any]:
    """Everything the timings depend on: the CPU and its flags, torch, the threads, and the step's shapes."""
    shapes = sorted((name, list(p.shape)) for name, p in model.named_parameters())
    model_sha = hashlib.sha256(json.dumps(shapes).encode("utf-8")).hexdigest()
    return {"cpu": cpu_description(), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "model_sha256": model_sha, "batch_size": int(batch_size), "img_size": list(cfg.img_size),
            "text_length": int(cfg.text_length), "losses": list(cfg.losses),
            "grad_checkpointing": bool(cfg.grad_checkpointing)}


def _entry_id(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _load_cache(path: str, warn: bool = True) -> Tuple[str, Dict[str, dict]]:
    """(state, entries) of the file at `path`: state "absent" (no file), "ours" (this project's cache, whose
    entries may be used and which may be replaced) or "foreign" (anything else: another file that
    PHP_PRECISION_CACHE happens to name, a corrupt one, one that cannot be read), with no entries; `warn` logs
    why a file is foreign."""
    if not os.path.lexists(path):
        return "absent", {}
    try:
        if not os.path.isfile(path):
            raise ValueError("not a regular file")
        if os.path.getsize(path) > MAX_CACHE_BYTES:
            raise ValueError(f"over {MAX_CACHE_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        return _foreign(path, f"{type(e).__name__}: {str(e)[:120]}", warn)
    if not _is_cache(data):
        return _foreign(path, "not a precision cache of this project", warn)
    entries = data.get("entries")
    if not isinstance(entries, dict):
        if warn:
            logger.warning("ignoring the precision cache %s (its entries are not a mapping); it is rewritten "
                           "after timing", path)
        return "ours", {}
    return "ours", entries


def _is_cache(data: Any) -> bool:
    """Whether JSON `data` is this project's cache: it carries CACHE_MARKER, or it is exactly what version 1 wrote
    before the marker existed ({"version": 1, "entries": ...}), so that those caches stay in use."""
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return False
    return data.get("format") == CACHE_MARKER or set(data) == {"version", "entries"}


def _foreign(path: str, why: str, warn: bool) -> Tuple[str, Dict[str, dict]]:
    if warn:
        logger.warning("ignoring the precision cache %s (%s); it is left as it is and nothing is cached: remove "
                       "it or point %s at another file", path, why, CACHE_ENV)
    return "foreign", {}


def read_cache(path: str) -> Dict[str, dict]:
    """The cache's entries; a missing file is empty, an unreadable or foreign one too, with a warning (the cache
    only saves time: it must never stop a run)."""
    return _load_cache(path)[1]


def entry_problem(entry: Any, key: Dict[str, Any]) -> Optional[str]:
    """Why the cached `entry` cannot stand for the timing of `key` (None if it can): it must be for this key, hold
    a finite positive time for each of TIMED, and name the precision those times choose (pick). A file anyone can
    edit is no measurement until it adds up."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        return "it is not for this key"
    timings = entry.get("timings")
    if not isinstance(timings, dict) or set(timings) != set(TIMED):
        return f"its timings are not one for each of {', '.join(TIMED)}"
    for mode, seconds in timings.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds <= 0:
            return f"its {mode} time {short_repr(seconds)} is not a positive number of seconds"
    if entry.get("precision") != pick(timings):
        return f"it says {short_repr(entry.get('precision'))} where its own timings choose {pick(timings)}"
    return None


def cached_entry(path: str, key: Dict[str, Any]) -> Optional[dict]:
    """The cache's entry for `key`, if it holds a valid one; an invalid one is named in the log (and timed again)."""
    entry = read_cache(path).get(_entry_id(key))
    if entry is None:
        return None
    problem = entry_problem(entry, key)
    if problem is not None:
        logger.warning("ignoring the cached precision choice in %s (%s); timing again", path, problem)
        return None
    return entry


def store(path: str, key: Dict[str, Any], precision: str, timings: Dict[str, float]) -> None:
    """Add the entry for `key`, atomically, to the cache at `path` if it is absent or this project's cache; any
    other file stays as it is (PHP_PRECISION_CACHE may name one by mistake; reading it warned already). Two runs
    storing at once may lose one entry: it is timed again later."""
    state, entries = _load_cache(path, warn=False)
    if state == "foreign":
        return
    entries[_entry_id(key)] = {"key": key, "precision": precision, "timings": timings, "date": utc_now()}
    text = json.dumps({"format": CACHE_MARKER, "version": CACHE_VERSION, "entries": entries}, indent=1,
                      sort_keys=True)
    try:
        write_atomic(path, text, what="the precision cache", make_folder=True)
    except UserError as e:
        logger.warning("%s; the next run times again", e)


def time_modes(step: Callable[[str], object], modes: Sequence[str] = TIMED, budget_s: float = BUDGET_S,
               clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds of `step(mode)` in each of `modes`: WARMUP_STEPS each, then up to TIMED_STEPS rounds, the modes
    interleaved in alternating order (a machine that speeds up or slows down during the rounds favours none). A
    round after the first starts only if it would end within `budget_s` of the start."""
    samples: Dict[str, list] = {m: [] for m in modes}
    start = clock()
    for mode in modes:
        for _ in range(WARMUP_STEPS):
            step(mode)
    for round_index in range(TIMED_STEPS):
        round_start = clock()
        for mode in (modes if round_index % 2 == 0 else tuple(reversed(modes))):
            t0 = clock()
            step(mode)
            samples[mode].append(clock() - t0)
        now = clock()
        if now - start + (now - round_start) > budget_s:
            break
    return {m: round(statistics.median(v), 6) for m, v in samples.items()}


def measure(cfg: Config, model: torch.nn.Module, device: torch.device, batch_size: int,
            budget_s: float = BUDGET_S) -> Dict[str, float]:
    """time_modes of the trainer's own step (processor/trainer.py train_step: forward, backward, optimizer) on a
    copy of `model`, with an optimizer of its own, on a synthetic batch of the run's shapes: the run's model, its
    gradients, its buffers and the global RNG (dropout draws) are left exactly as they were, so that a run trains
    the same whether it timed or not."""
    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(model).train()
        # Uncompiled: a compilation would take the whole budget; the step is the same function.
        trainer = Trainer(cfg.copy(precision="fp32", torch_compile="none"), probe, device=device, describe=False)
        batch = training_batch(cfg, batch_size, device)

        def step(mode: str) -> None:
            trainer.cfg.precision = mode
            trainer.train_step(batch).tolist()  # the values read back: the step has finished
        return time_modes(step, budget_s=budget_s)


def pick(timings: Dict[str, float]) -> str:
    """bf16 when it is faster than fp32 by MARGIN, else fp32."""
    return "bf16" if timings["bf16"] < (1.0 - MARGIN) * timings["fp32"] else "fp32"


def choose_precision(cfg: Config, model: torch.nn.Module, device: torch.device, batch_size: Optional[int] = None,
                     budget_s: float = BUDGET_S) -> Choice:
    """The precision `auto` means for `model` on `device` with a per-process batch of `batch_size` (default
    cfg.batch_size); logged. A failure to time (a loss that needs what a synthetic batch lacks, an operation bf16
    does not support) chooses fp32 with a warning: never an error."""
    started = time.perf_counter()
    if device.type == "cuda":
        # Native support only: emulated bf16 (before Ampere) runs far slower than fp16 with its tensor cores.
        with torch.cuda.device(device):
            chosen = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return _report(Choice(chosen, source="cuda", seconds=round(time.perf_counter() - started, 3)))
    if device.type != "cpu":
        return _report(Choice("fp32", source="fallback", note=f"no timing on {device.type}"))
    batch_size = int(batch_size or cfg.batch_size)
    key, path = cache_key(cfg, model, batch_size), cache_path()
    entry = cached_entry(path, key)
    if entry is not None:
        timings = {m: entry["timings"][m] for m in TIMED if m in entry["timings"]}
        return _report(Choice(entry["precision"], timings, True,
                              round(time.perf_counter() - started, 3), "cache"))
    try:
        timings = measure(cfg, model, device, batch_size, budget_s)
    except Exception as e:  # noqa: BLE001 - whatever the probe hits, the run trains on in fp32
        note = f"timing failed ({type(e).__name__}: {str(e)[:200]})"
        return _report(Choice("fp32", {}, False, round(time.perf_counter() - started, 3), "fallback", note))
    chosen = pick(timings)
    store(path, key, chosen, timings)
    return _report(Choice(chosen, timings, False, round(time.perf_counter() - started, 3), "timed"))


def _report(choice: Choice) -> Choice:
    if choice.source == "fallback":
        logger.warning("precision auto: fp32, %s", choice.note)
    elif choice.timings:
        figures = ", ".join(f"{m} {s:.4f} s/step" for m, s in choice.timings.items())
        how = "from the cache" if choice.cached else f"timed in {choice.seconds:.1f} s"
        logger.info("precision auto: %s (%s; %s on %s, %d thread(s))", choice.precision, figures, how,
                    describe_cpu(), torch.get_num_threads())
    else:
        logger.info("precision auto: %s (%s)", choice.precision, choice.source)
    return choice


def recorded_choice(ckpt: Optional[dict]) -> Optional[Choice]:
    """The precision the run of checkpoint `ckpt` trained in (its own record), as a Choice; None for a fresh start
    or a checkpoint without one. A resumed run keeps it: timing again could choose otherwise, and the run would no
    longer continue as it started."""
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    precision = config.get("precision") if isinstance(config, dict) else None
    if precision not in CHOSEN:
        return None
    earlier = (ckpt.get("provenance") or {}).get("precision_choice") or {}
    timings = earlier.get("timings") if isinstance(earlier.get("timings"), dict) else {}
    return Choice(precision, dict(timings), False, 0.0, "recorded")


def resolve_precision(cfg: Config, model: torch.nn.Module, device: torch.device, batch_size: int, rank: int = 0,
                      world_size: int = 1, recorded: Optional[Choice] = None) -> Tuple[Config, Optional[Choice]]:
    """(cfg with `precision` resolved, the Choice or None): an explicit precision is kept as it is and nothing is
    timed; `auto` becomes `recorded` (a resumed run's), else what choose_precision says on rank 0, shared with
    every process (they must all train alike; timing on each would also make them slow each other down)."""
    if cfg.precision != "auto":
        return cfg, None
    if recorded is not None:
        logger.info("precision auto: %s, as the run recorded when it started (not timed again)", recorded.precision)
        choice = recorded
    elif rank == 0:
        choice = choose_precision(cfg, model, device, batch_size)
    else:
        choice = None
    if world_size > 1:
        choice = _shared(choice, rank, device)
    return cfg.copy(precision=choice.precision), choice


def _shared(choice: Optional[Choice], rank: int, device: torch.device) -> Choice:
    """Rank 0's choice on every process (only rank 0 records provenance, so the others need the precision only)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return choice
    code = torch.tensor([CHOSEN.index(choice.precision) if rank == 0 else -1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        code = code.to(device)
    dist.broadcast(code, src=0)
    return choice if rank == 0 else Choice(CHOSEN[int(code.item())], source="rank 0")
