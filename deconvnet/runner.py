"""The runner of long work: progress bars, atomic writes (a killed write never leaves a bad file),
torchrun, and the one cache of results (:func:`cached`) and of cached steps (:func:`run_step`).

A cache entry is keyed by the function, its arguments, the SHA-256 of its input files and the source of
the package modules it can run (:func:`source_key`), so a code change redoes exactly the work it can
affect. ``reproduce`` and ``report`` run their steps through :func:`run_step`; the top-k tables of
``topk``, ``serve`` and ``atlas`` and the ablation's errors go through :func:`cached`.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that stays quiet when stderr is not a terminal (logs, CI) and leaves no trace."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name created with mode 0666, so the umask gives the file the usual permissions (mkstemp: 0600)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` that either fully replaces ``path`` or leaves the old file untouched."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def device_of(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> the device, or a
    one-line :class:`UserError` for an unknown name or a GPU this machine does not have."""
    from .errors import UserError

    if isinstance(spec, torch.device):
        return spec
    spec = spec or "auto"
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        spec = f"cuda:{_local_rank()}"  # under torchrun: each process on the GPU of its local rank
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if (device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and device.index not in (None, _local_rank())):  # every rank on one GPU would stall NCCL
        raise UserError(f"--device {spec} under torchrun: each process takes the GPU of its local rank; "
                        "use --device cuda (or auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this PyTorch build sees no CUDA device (torch {torch.__version__}); "
                            "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters (or buffers) are on; the CPU for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the torchrun process group when launched by torchrun: NCCL where there is CUDA (each
    process on the GPU of its LOCAL_RANK), gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(_local_rank())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        return True
    return False


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def collective_device() -> torch.device:
    """Where tensors of a collective (all_reduce, all_gather) must be: this process's GPU under NCCL,
    else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sum ``values`` over the torchrun processes (identity in a single process)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


@contextlib.contextmanager
def distributed():
    """Inside: the torchrun process group when launched by torchrun (left afterwards), else nothing."""
    started = init_distributed()
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the cache

PACKAGE = Path(__file__).parent


def cache_dir() -> Path:
    """Where cached results live: ``$DECONVNET_CACHE``, else ``$XDG_CACHE_HOME/deconvnet`` (``~/.cache``)."""
    if os.environ.get("DECONVNET_CACHE"):
        return Path(os.environ["DECONVNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deconvnet"


def _imports(tree: ast.AST) -> set[str]:
    """The package modules imported anywhere in ``tree`` (``from .x import``, ``from . import x``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def source_key(module: str, function: str | None = None) -> str:
    """SHA-256 over the source a function can run: its module and every package module imported by
    it, transitively. With ``function``, the module's imports count only at its top level and in that
    function (so ``commands.occlude`` depends on occlusion.py, and ``commands.train`` does not)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    if function is None:
        todo = _imports(tree)
    else:  # the module's top level, the function and the module's functions it calls, transitively
        defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        used, pending = set(), [function]
        while pending:
            name = pending.pop()
            if name in defs and name not in used:
                used.add(name)
                pending.extend(n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name))
        top = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        todo = _imports(ast.Module(body=top + [defs[name] for name in used], type_ignores=[]))
    seen = {module}
    todo = list(todo - seen)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imports(ast.parse((PACKAGE / f"{name}.py").read_text())) - seen)
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + (PACKAGE / f"{name}.py").read_bytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights and buffers (random weights included, unlike a file's hash)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(function: Callable, arguments: dict, files: list[str | Path] = ()) -> str:
    """The key of ``function(**arguments)`` over the content of ``files``: JSON-able ``arguments``, the
    files' SHA-256 and :func:`source_key` of the function."""
    module = function.__module__.rpartition(".")[2]
    text = json.dumps({"function": f"{module}.{function.__name__}", "arguments": arguments,
                       "files": {str(f): file_sha256(f) for f in files},
                       "source": source_key(module, function.__name__)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cached(path: str | Path, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """``(value, reused)``: the value stored at ``path`` under ``key``, or ``compute()``, then stored
    there atomically with its key. A ``.json`` path holds JSON; any other a ``torch.save`` file of
    tensors, numbers, strings, lists and dicts. An unreadable or stale entry is computed again."""
    path = Path(path)
    saved = load_cached(path, key)
    if saved is not None:
        return saved, True
    value = compute()
    if path.suffix == ".json":
        atomic_write_json(path, {"key": key, "value": value})
    else:
        atomic_torch_save({"key": key, "value": value}, path)
    return value, False


def load_cached(path: str | Path, key: str) -> Any | None:
    """The value :func:`cached` stored at ``path`` under ``key``; None when there is none for that key."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            saved = json.loads(path.read_text())
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, damaged or from another version: computed again
        return None
    return saved["value"] if isinstance(saved, dict) and saved.get("key") == key else None


@dataclass
class Step:
    """One cached step: ``function(**options, out=root/name)``, keyed by the options, the content of
    ``inputs`` (paths relative to the root) and the source the function can run. ``command`` is the
    equivalent ``deconvnet`` command line (provenance); ``paths``: the options that are paths relative to
    the root; ``resume``, for work that can continue after an
    interruption, gives the options that continue it in its directory (else the step starts afresh)."""

    name: str
    function: Callable
    options: dict
    inputs: list[str] = field(default_factory=list)
    command: str = ""
    paths: tuple[str, ...] = ()  # options naming files under the root, relative (so a moved root keeps its cache)
    resume: Callable[[Path], dict] | None = None


def format_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def step_key(step: Step, root: Path) -> str:
    return cache_key(step.function, step.options, [root / p for p in step.inputs])


def run_step(step: Step, root: Path, position: str, estimate: float | None = None) -> dict:
    """Run ``step`` unless ``root/name`` holds its result for the same key; prints one line (``cached``
    for a reused step) and returns its record (key, command, seconds, finished)."""
    out = root / step.name
    key = step_key(step, root)
    started_marker = out / "started.json"  # the key of the run that was interrupted here, if any
    same_run = started_marker.is_file() and json.loads(started_marker.read_text()).get("key") == key

    def compute() -> dict:
        print(f"{position} {step.name:<14} running" + (f", estimated {format_seconds(estimate)}" if estimate else ""), flush=True)
        options = {**step.options, "out": str(out)}
        for name in step.paths:
            if isinstance(options.get(name), str):
                options[name] = str(root / options[name])
            elif isinstance(options.get(name), list):
                options[name] = [str(root / p) for p in options[name]]
        if same_run and step.resume is not None:
            options.update(step.resume(out))
        elif out.exists():
            shutil.rmtree(out)  # outputs of other options (a changed budget) or of unfinished work
        atomic_write_json(started_marker, {"key": key})
        started = time.time()
        with open(out / "console.txt", "a") as log, contextlib.redirect_stdout(log):  # one line per step
            result = step.function(**options)
        started_marker.unlink()
        return {"command": step.command, "seconds": round(time.time() - started, 1),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": _headline(result)}

    record, reused = cached(out / "step.json", key, compute)
    said = f": {record['summary']}" if record.get("summary") else ""
    if reused:
        print(f"{position} {step.name:<14} cached ({format_seconds(record['seconds'])} when it ran){said}", flush=True)
    else:
        print(f"{position} {step.name:<14} done in {format_seconds(record['seconds'])}{said}", flush=True)
    return record


def _headline(result) -> str:
    """What a step's one console line says of its result: the verdicts of its findings, or a trained
    run's accuracy (the whole output is in the step's ``console.txt`` and JSON)."""
    from .findings import tally

    if isinstance(result, list) and all(isinstance(f, dict) and "verdict" in f for f in result):
        return tally(result)
    if isinstance(result, dict) and "val_top1" in result:
        return f"val top-1 {100 * result['val_top1']:.2f}%"
    return ""
