"""Checkpoints of every stage: megatron-core dist-checkpoints written atomically, in iteration directories.

A checkpoint directory holds the tensors of its states stored by global key and shard offset (so one saved at a
DP/TP/PP layout loads at another), a replicated ``common`` part, and ``bliss_checkpoint.json``: the step, each model's
role and full config, and whatever the stage adds. :class:`CheckpointManager` owns a stage's ``iter_NNNNNNN``
directories, the latest marker and keep-last; :func:`save_model` / :func:`load_model` write and read one model's
weights (exports and warm starts). States are given by name, the way torchtitan's ``CheckpointManager`` takes them:
a :class:`ModelState`, an optimizer state, :class:`ParamAlignedState` (tensors shaped like a model's parameters), or
any object with ``state_dict``/``load_state_dict`` (its state goes to ``common``: numbers, strings, lists, dicts
and small tensors).

Writes go to ``<dir>.tmp``, which rank 0 renames once every rank is done, then the marker is replaced; a run killed
at any instant leaves either the old or the new checkpoint.

What loading runs. Three kinds of a checkpoint's data are pickles, and :func:`load` reads each without running
code from it: ``.metadata`` (torch's distributed-checkpoint index) through an unpickler that builds only torch's
checkpoint-metadata classes, ``torch.Size``, dtypes and layouts; ``common.pt`` and the object items of the
``*.distcp`` files (megatron's ``_extra_state``) with ``torch.load(weights_only=True)``, whatever the torch version's
default; the tensor items of ``*.distcp`` are read by torch's own reader, which passes ``weights_only=True`` on torch
2.13 (checked by the tests on the installed torch only). ``bliss_checkpoint.json``, megatron-core's ``metadata.json``
and the latest marker are JSON or text. A file that would build anything else is refused with a
:class:`CheckpointError` naming it before anything in it runs, and a truncated or corrupt one is a
:class:`CheckpointError` naming it too. Limits: ``weights_only`` is torch's own restricted unpickler, so its safety
is torch's (the package requires torch >= 2.6, which closed the published way around it in earlier versions); a
crafted checkpoint can still make a load fail or use much memory; and only :func:`load` and its callers are guarded,
not other megatron-core or torch entry points (e.g. ``dist_checkpointing.load_common_state_dict``), which unpickle
freely. So :func:`load` (every stage's resume and warm start) can read a checkpoint from someone else without
running its code; any other tool that opens the same files should be treated as running what they contain.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import queue
import random
import shutil
from collections.abc import Mapping

import numpy as np
import torch

from megatron_bliss import parallel
from megatron_bliss.models.presets import ModelConfig

logger = logging.getLogger(__name__)

METADATA_FILE = "bliss_checkpoint.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 2
DISTOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""Distributed-optimizer sharding format that reloads under a changed layout (the 0.16 default cannot be saved)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or unsafe to load, or does not match what should be loaded
    into."""


# ------------------------------------------------------------------------------------------------------- states
class ModelState:
    """A model (or the list of its virtual-pipeline chunks) with its config and role ('target', 'proxy', 'score').

    Loading checks the saved shape and role against this model's, naming both presets when they differ.
    """

    def __init__(self, model, cfg: ModelConfig, role: str):
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.cfg, self.role = cfg, role
        self._sharded: dict | None = None

    def sharded_state_dict(self, is_loading: bool) -> dict:
        if len(self.chunks) == 1:
            self._sharded = {"model": self.chunks[0].sharded_state_dict()}
        else:
            self._sharded = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(self.chunks)}
        return self._sharded

    def load_sharded(self, loaded: dict) -> None:
        if len(self.chunks) == 1:
            self.chunks[0].load_state_dict(loaded["model"], strict=True)
        else:
            for i, chunk in enumerate(self.chunks):
                chunk.load_state_dict(loaded[f"model{i}"], strict=True)

    def parameters(self) -> list:
        return [p for chunk in self.chunks for p in chunk.parameters()]

    def metadata(self) -> dict:
        from megatron_bliss.config import to_dict

        return {"role": self.role, "preset": self.cfg.preset, "shape": self.cfg.shape_dict(),
                "config": to_dict(self.cfg)}

    def check(self, saved: dict | None, path: str, name: str) -> None:
        """Raises CheckpointError when ``saved`` (this model's entry in the metadata) is another role or shape."""
        if saved is None:
            raise CheckpointError(f"checkpoint {path} holds no model {name!r}")
        if self.role and saved.get("role") != self.role:
            raise CheckpointError(f"checkpoint {path} holds a {saved.get('role')} model, expected a {self.role} model")
        wanted = self.cfg.shape_dict()
        diffs = [f"{k}: checkpoint {saved['shape'].get(k)} vs config {v}" for k, v in wanted.items()
                 if saved["shape"].get(k) != v]
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} was saved from preset {saved.get('preset')!r}, which does not match preset "
                f"{self.cfg.preset!r} of this run ({'; '.join(diffs)})")

    def _param_map(self, params) -> dict:
        """Optimizer parameter index -> the model's ShardedTensor of that parameter (built by the last call)."""
        from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

        return get_param_id_to_sharded_param_map(self._sharded, params)


class MegatronOptimizerState:
    """A megatron-core optimizer (distributed or not), saved in its own resharding format beside its model."""

    def __init__(self, optimizer, model: ModelState):
        self.optimizer, self.model = optimizer, model

    def sharded_state_dict(self, is_loading: bool) -> dict:
        return self.optimizer.sharded_state_dict(self.model._sharded, is_loading=is_loading,
                                                 metadata=DISTOPT_METADATA)

    def load_sharded(self, loaded: dict) -> None:
        self.optimizer.load_state_dict(loaded)


class TorchOptimizerState:
    """A plain ``torch.optim`` optimizer over a model's parameters: each per-parameter state tensor is sharded like
    its parameter, so it reloads under another layout; the step counter goes to the replicated part."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: ModelState):
        self.optimizer, self.model = optimizer, model
        self.saved: dict | None = None  # the saved checkpoint's info(), set by load()

    def _params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def info(self) -> dict:
        """Which parameters have state, and its tensor names (a load builds templates of exactly these)."""
        state = self.optimizer.state_dict()["state"]
        keys = sorted({k for s in state.values() for k in s if k != "step"})
        return {"params_with_state": sorted(int(i) for i in state), "keys": keys}

    def sharded_state_dict(self, is_loading: bool) -> dict:
        from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        params = self._params()
        id_map = self.model._param_map(params)
        state = self.optimizer.state_dict()
        if is_loading:  # torch creates state lazily: templates of every tensor the saved state has
            keys, with_state = self.saved["keys"], self.saved["params_with_state"]
            state["state"] = {i: {k: torch.zeros_like(params[i]) for k in keys} for i in with_state}
        steps = {int(i): float(s["step"]) for i, s in state["state"].items() if "step" in s}
        sharded = {int(i): {k: make_sharded_optimizer_tensor(id_map[int(i)], v, prefix=f"optim.{self.model.role}.{k}")
                            for k, v in s.items() if k != "step"}
                   for i, s in state["state"].items()}
        groups = []
        for group in state["param_groups"]:
            groups.append({**group, "params": LocalNonpersistentObject(group["params"])})
        return {"state": sharded, "param_groups": groups, "step": steps}

    def load_sharded(self, loaded: dict) -> None:
        steps = {int(k): v for k, v in loaded.pop("step").items()}
        state = {int(i): dict(s) for i, s in loaded["state"].items() if int(i) in steps}
        for i, s in state.items():
            s["step"] = torch.tensor(steps[i], dtype=torch.float32)
        self.optimizer.load_state_dict({"state": state, "param_groups": loaded["param_groups"]})


class ParamAlignedState:
    """A list of tensors aligned with a model's parameters (the bilevel warm-start z), or None; reloads resharded.

    Args:
        model: the model whose parameters the tensors follow.
        get / set: read and replace the list (None means absent).
    """

    def __init__(self, model: ModelState, name: str, get, set):
        self.model, self.name, self._get, self._set = model, name, get, set
        self.saved: dict | None = None  # the saved checkpoint's info(), set by load()

    def info(self) -> dict:
        return {"present": self._get() is not None}

    def sharded_state_dict(self, is_loading: bool) -> dict:
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        params = self.model.parameters()
        tensors = self._get()
        if is_loading:
            tensors = [torch.zeros_like(p) for p in params] if self.saved["present"] else None
        if tensors is None:
            return {}
        id_map = self.model._param_map(params)
        return {"tensors": {i: make_sharded_optimizer_tensor(id_map[i], t, prefix=self.name)
                            for i, t in enumerate(tensors)}}

    def load_sharded(self, loaded: dict) -> None:
        tensors = loaded.get("tensors")
        self._set([tensors[i] for i in range(len(tensors))] if tensors is not None else None)


class RNGState:
    """Every rank's Python, numpy, torch, CUDA and megatron-tracker RNG states; restored only at the same layout.

    Args:
        layout: the saving run's layout (world size, TP, PP, VPP); another layout skips the restore with a warning
            (the states only matter with dropout).
    """

    def __init__(self, layout: dict):
        self.layout = layout

    def state_dict(self) -> dict:
        return {"layout": self.layout, "ranks": parallel.all_gather_object(_local_rng_state())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout") != self.layout or len(state.get("ranks", [])) != parallel.world_size():
            logger.warning("checkpoint layout %s differs from this run's %s: RNG states not restored (they only "
                           "matter with dropout)", state.get("layout"), self.layout)
            return
        _restore_rng_state(state["ranks"][parallel.rank()])


def _local_rng_state() -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.cpu() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _is_sharded(state) -> bool:
    return hasattr(state, "sharded_state_dict")


# ------------------------------------------------------------------------------------------------ safe reading
DCP_METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = {
    f"{_DCP}.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                         "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    f"{_DCP}.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}
"""What torch's checkpoint index may build (besides ``torch`` dtypes): its metadata dataclasses and enums."""


def _damaged(path: str, name: str, exc: BaseException) -> CheckpointError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CheckpointError(f"checkpoint {path} is damaged: {name} could not be read "
                           f"({type(exc).__name__}{': ' + detail if detail else ''})")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds torch's checkpoint metadata and nothing else: any other global is refused before it is called."""

    def find_class(self, module: str, name: str):
        value = super().find_class(module, name) if name in _METADATA_GLOBALS.get(module, ()) else None
        if value is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            value = getattr(torch, name)
        if value is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return value

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def read_dcp_metadata(path: str):
    """The torch distributed-checkpoint index ``path/.metadata``, unpickled without running code from it.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or would build anything but checkpoint metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.path.join(path, DCP_METADATA_FILE)
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused"):
            raise CheckpointError(
                f"checkpoint {path} is damaged or crafted: {file} is not plain checkpoint metadata ({exc}); "
                "refused without running it") from exc
        raise _damaged(path, file, exc) from exc
    except Exception as exc:
        raise _damaged(path, file, exc) from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {path} is damaged: {file} holds a {type(metadata).__name__}, not "
                              "checkpoint metadata")
    return metadata


def _torch_load(source, path: str, name: str):
    """``torch.load(weights_only=True)`` of a checkpoint file or item: tensors and plain data, or CheckpointError."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged or crafted: {name} holds more than tensors and plain data, refused "
            f"without running it ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})") from exc
    except Exception as exc:
        raise _damaged(path, name, exc) from exc


class _SafeBytesPlanner:
    """A load planner whose non-tensor items are first read with ``weights_only=True`` (torch's own planner unpickles
    them freely); everything else is the wrapped planner's."""

    def __init__(self, planner, path: str, file: str):
        self._planner, self._path, self._file = planner, path, file

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = _torch_load(value, self._path, f"{self._file} (item {read_item.dest_index.fqn})")
        safe = io.BytesIO()  # what the planner unpickles now holds only what weights_only built
        torch.save(obj, safe)
        safe.seek(0)
        self._planner.load_bytes(read_item, safe)


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """torch's reader with :func:`read_dcp_metadata` for the index, safe non-tensor items, and errors naming the
        ``.distcp`` file that failed."""

        def __init__(self, path):
            super().__init__(path)
            self.checkpoint_dir, self._metadata = str(path), None

        def read_metadata(self):
            if self._metadata is None:
                metadata = read_dcp_metadata(self.checkpoint_dir)
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._metadata = metadata
            return self._metadata

        def read_data(self, plan, planner):
            per_file: dict = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for name, items in per_file.items():
                file = os.path.join(self.checkpoint_dir, name)
                try:
                    super().read_data(dataclasses.replace(plan, items=items),
                                      _SafeBytesPlanner(planner, self.checkpoint_dir, file)).wait()
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise _damaged(self.checkpoint_dir, file, exc) from exc
            done = torch.futures.Future()
            done.set_result(None)
            return done

    return SafeFileSystemReader


def _load_strategies() -> tuple:
    """megatron-core's torch_dist load strategies with every read made safe (see the module docstring).

    megatron-core builds its reader in a module function; it is replaced (once) by one returning the safe reader.
    """
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    if not getattr(mtorch._get_filesystem_reader, "_megatron_bliss_safe", False):
        reader_cls = _safe_reader_class()

        def safe_reader(checkpoint_dir, cache_metadata: bool = False):
            return reader_cls(checkpoint_dir)

        safe_reader._megatron_bliss_safe = True
        mtorch._get_filesystem_reader = safe_reader

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = os.path.join(str(checkpoint_dir), COMMON_FILE)
            return _torch_load(path, str(checkpoint_dir), path)

    return mtorch.TorchDistLoadShardedStrategy(), SafeCommonLoadStrategy()


def _dcp_failure(exc: BaseException) -> BaseException:
    """The first rank's exception inside torch's CheckpointException (which gathers every rank's)."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


# ------------------------------------------------------------------------------------------ one checkpoint dir
def read_metadata(path: str) -> dict:
    """The ``bliss_checkpoint.json`` of a finished checkpoint; raises CheckpointError when absent."""
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        if os.path.isdir(path + ".tmp"):
            raise CheckpointError(f"checkpoint {path} was not finished (only {path}.tmp exists)")
        raise CheckpointError(f"{path} is not a megatron_bliss checkpoint (no {METADATA_FILE})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or UTF-8
        raise _damaged(path, meta_path, exc) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: {meta_path} holds no JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format {meta.get('format_version')}, this version reads "
                              f"format {FORMAT_VERSION}")
    kinds = {"models": dict, "states": list, "info": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is damaged: {meta_path} lacks a valid {', '.join(wrong)}")
    return meta


def model_config(path: str, name: str = "model") -> ModelConfig:
    """The full config of model ``name`` saved in checkpoint ``path`` (a directory or a save_dir's latest)."""
    from megatron_bliss.config import from_dict

    path = resolve(path)
    saved = read_metadata(path)["models"].get(name)
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no model {name!r}")
    return from_dict(ModelConfig, saved["config"], f"{path}/{METADATA_FILE}")


def save(path: str, states: Mapping[str, object], metadata: dict | None = None) -> None:
    """Writes ``states`` (see the module docstring) to directory ``path`` atomically; every rank calls it.

    Args:
        path: the final directory; an existing one is replaced.
        states: name -> state.
        metadata: JSON-serializable facts added to ``bliss_checkpoint.json`` (e.g. ``step``).
    """
    from megatron.core import dist_checkpointing

    tmp = path + ".tmp"
    if parallel.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier()
    sharded = _sharded(states, is_loading=False)
    sharded["common"] = {name: s.state_dict() for name, s in states.items() if not _is_sharded(s)}
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        # saves are synchronous: a plain queue instead of the multiprocessing Manager server megatron-core would
        # start, which only an exit handler stops, so a SIGKILL of this process would orphan it
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded, tmp, content_metadata=DISTOPT_METADATA)
    parallel.barrier()
    if parallel.is_rank0():
        models = {name: s.metadata() for name, s in states.items() if isinstance(s, ModelState)}
        info = {name: s.info() for name, s in states.items() if hasattr(s, "info")}
        meta = {"format_version": FORMAT_VERSION, "models": models, "states": sorted(states), "info": info,
                **(metadata or {})}
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    parallel.barrier()
    logger.info("saved checkpoint %s (%s)", path, ", ".join(states))


def load(path: str, states: Mapping[str, object]) -> dict:
    """Fills ``states`` from checkpoint ``path``, whatever layout saved it; returns its metadata.

    No file of the checkpoint runs code while it is read (see the module docstring).

    Raises:
        CheckpointError: the checkpoint is unfinished, damaged (naming the file where known), holds something other
            than checkpoint data, lacks a state, or holds a model of another shape or role.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_metadata(path)
    missing = [name for name in states if name not in meta["states"]]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} state (it holds {meta['states']})")
    for name, s in states.items():
        if isinstance(s, ModelState):
            s.check(meta["models"].get(name), path, name)
        if hasattr(s, "info"):
            s.saved = meta["info"][name]
    read_dcp_metadata(path)  # a damaged or crafted index is refused here, naming it, before anything else
    sharded = _sharded(states, is_loading=True)
    sharded["common"] = {}
    sharded_strategy, common_strategy = _load_strategies()
    try:
        loaded = dist_checkpointing.load(sharded, path, sharded_strategy=sharded_strategy,
                                         common_strategy=common_strategy)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        inner = _dcp_failure(exc)
        if isinstance(inner, CheckpointError):
            raise CheckpointError(str(inner)) from inner
        raise CheckpointError(f"checkpoint {path} is damaged or unreadable ({type(inner).__name__}: "
                              f"{str(inner).strip().splitlines()[0] if str(inner).strip() else ''})") from exc
    for name, s in states.items():
        if _is_sharded(s):
            s.load_sharded(loaded[name])
        else:
            s.load_state_dict(loaded["common"][name])
    return meta


def _sharded(states: Mapping[str, object], is_loading: bool) -> dict:
    """Sharded state dicts by name, models first (optimizer and aligned states map onto their model's)."""
    order = sorted((name for name, s in states.items() if _is_sharded(s)),
                   key=lambda n: not isinstance(states[n], ModelState))
    return {name: states[name].sharded_state_dict(is_loading) for name in order}


def save_model(path: str, model, cfg: ModelConfig, role: str, metadata: dict | None = None) -> None:
    """The weights of one model to directory ``path`` (name ``model``); every rank calls it."""
    save(path, {"model": ModelState(model, cfg, role)}, metadata)


def load_model(path: str, model, cfg: ModelConfig, role: str | None = None) -> dict:
    """Fills ``model`` with the weights of checkpoint ``path`` (a directory, or a save_dir's latest)."""
    return load(resolve(path), {"model": ModelState(model, cfg, role)})


# ------------------------------------------------------------------------------------------ iteration dirs
def list_checkpoints(directory: str) -> list:
    """Finished ``iter_NNNNNNN`` checkpoints of ``directory`` in step order (unfinished ``.tmp`` ones skipped)."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.startswith("iter_") and not n.endswith(".tmp")
             and os.path.isfile(os.path.join(directory, n, METADATA_FILE))]
    return [os.path.join(directory, n) for n in sorted(names)]


def resolve(path: str) -> str:
    """A checkpoint directory from ``path``: itself, or the latest of a save_dir (its marker, else its newest)."""
    manager = CheckpointManager(path)
    step = manager.latest_step()
    if step is not None:
        return manager.iteration_dir(step)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, METADATA_FILE)):
        found = list_checkpoints(path)
        if found:
            return found[-1]
    read_metadata(path)  # a clear CheckpointError for a missing or unfinished checkpoint
    return path


class CheckpointManager:
    """A stage's checkpoints: ``save_dir/iter_NNNNNNN`` directories and the ``latest`` marker, keeping the newest.

    Args:
        save_dir: the directory (None or '' disables saving and resuming).
        keep_last: finished checkpoints to keep (None keeps all).
    """

    def __init__(self, save_dir: str | None, keep_last: int | None = None):
        self.save_dir, self.keep_last = save_dir, keep_last

    def iteration_dir(self, step: int) -> str:
        return os.path.join(self.save_dir, f"iter_{step:07d}")

    def latest_step(self) -> int | None:
        """Step named by the latest marker, or None when there is none."""
        if not self.save_dir:
            return None
        path = os.path.join(self.save_dir, LATEST_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
        return int(text)

    def save(self, step: int, states: Mapping[str, object], metadata: dict | None = None,
             mark_latest: bool = True) -> str:
        """Writes ``iter_{step}``, then (with ``mark_latest``) points the marker at it and prunes old ones."""
        path = self.iteration_dir(step)
        save(path, states, {"step": step, **(metadata or {})})
        if mark_latest:
            if parallel.is_rank0():
                tmp = os.path.join(self.save_dir, LATEST_FILE + ".tmp")
                with open(tmp, "w") as f:
                    f.write(f"{step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(self.save_dir, LATEST_FILE))
                if self.keep_last:
                    for old in list_checkpoints(self.save_dir)[:-self.keep_last]:
                        shutil.rmtree(old, ignore_errors=True)
            parallel.barrier()
        return path

    def load_latest(self, states: Mapping[str, object]) -> dict | None:
        """Fills ``states`` from the latest checkpoint; None (nothing loaded) when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return load(self.iteration_dir(step), states)
