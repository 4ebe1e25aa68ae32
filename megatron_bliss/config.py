"""Layered configuration: dataclass defaults, then a YAML file, then ``--section.key=value`` overrides.

Each concern owns its dataclass next to its code (``ModelConfig`` in models/presets.py, ``ParallelConfig`` in
parallel.py, ...). An entry point composes them into a root dataclass whose fields are those sections and calls
:func:`load_config`. Unknown sections or keys are an error naming the file (or the override) and the key; values are
checked against the field's type. The resolved configuration is written to the run directory with :func:`dump`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or a value of the wrong type."""


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/coerces ``value`` to annotation ``tp`` (int, float, str, bool, Optional, list, dict, dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], values: dict, where: str) -> T:
    types_ = _field_types(cls)
    defaults_hook = getattr(cls, "config_defaults", None)
    if callable(defaults_hook):  # e.g. ModelConfig fills a preset's shape under the given keys
        try:
            values = {**defaults_hook(values), **values}
        except ValueError as exc:
            raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
    unknown = sorted(set(values) - set(types_))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(types_))}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def from_dict(cls: type[T], values: dict, where: str = "") -> T:
    """``cls`` built from plain values with the checks and hooks a config file gets (``where`` names the source in
    errors); raises ConfigError."""
    return _build(cls, values, where)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: Sequence[str]) -> dict:
    """Turns ``["--model.num_layers=4", "--optim.lr", "1e-3"]`` into a nested dict; values parsed as YAML."""
    out: dict = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"override {arg!r} has no value")
            value = items[i + 1]
            i += 1
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    loaded.pop("_base_", None)
    return loaded


def _check_reserved(cls, values: dict, where: str) -> None:
    """Refuses keys a root class reserves (``reserved_keys``: {"section.key": why}) when the user set them."""
    for dotted, why in getattr(cls, "reserved_keys", {}).items():
        section, _, key = dotted.partition(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            raise ConfigError(f"{where}: {dotted} cannot be set here: {why}")


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Builds ``cls`` from its defaults, the YAML file at ``path`` and command-line overrides.

    Args:
        cls: root dataclass; its fields are the sections. Its optional ``reserved_keys`` mapping
            (``"section.key"`` -> reason) names fields the user may not set (a caller sets them).
        path: YAML file or None.
        overrides: ``--section.key=value`` strings (or ``--section.key value`` pairs).

    Raises:
        ConfigError naming the file or override and the offending key.
    """
    return _load(cls, _read_yaml(path), parse_overrides(overrides), path)


def load_stage_config(cls: type[T], paths_cls: type, path: str | None = None,
                      overrides: Sequence[str] = ()) -> tuple:
    """``(config, paths)`` of a stage: the ``paths`` section (of the file and of ``--paths.key=value``) builds
    ``paths_cls``, everything else builds ``cls``, as :func:`load_config` does."""
    values, extra = _read_yaml(path), parse_overrides(overrides)
    file_paths, extra_paths = values.pop("paths", None) or {}, extra.pop("paths", None) or {}
    cfg = _load(cls, values, extra, path)
    return cfg, _load(paths_cls, file_paths, extra_paths, path, "paths")


def _load(cls, values: dict, extra: dict, path: str | None, where: str = ""):
    """``cls`` from file ``values`` then override values ``extra``; errors name the file or the override."""
    try:
        _check_reserved(cls, values, str(path))
        base = _build(cls, values, where)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if extra:
        # merge raw values, not the resolved config, so derived defaults (e.g. ffn = 4h) follow the overrides
        try:
            _check_reserved(cls, extra, "command-line override")
            base = _build(cls, _merge(values, extra), where)
        except ConfigError as exc:
            raise ConfigError(f"command-line override: {exc}") from None
    validate = getattr(base, "validate", None)
    if callable(validate):
        validate()
    return base


def to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_hash(cfg, exclude: Sequence[str] = ()) -> str:
    """Stable short hash of a config or plain dict (top-level keys in ``exclude`` left out), for refusing to mix
    outputs on resume."""
    d = dict(cfg) if isinstance(cfg, dict) else to_dict(cfg)
    for key in exclude:
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump(cfg, path: str, paths=None) -> None:
    """Writes the resolved config (with its ``paths`` section, when given) as YAML, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    values = to_dict(cfg)
    if paths is not None:
        values["paths"] = to_dict(paths)
    with open(tmp, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    os.replace(tmp, path)


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, description: str = "",
              prog: str | None = None, paths_cls: type | None = None):
    """``--config FILE`` plus ``--section.key=value`` overrides from ``argv`` (default ``sys.argv[1:]``); a bad
    file, key or value exits with a usage error naming it. With ``paths_cls``, returns ``(config, paths)`` as
    :func:`load_stage_config` does."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Any config field can be overridden as --section.key=value.")
    parser.add_argument("--config", help="YAML file layered over the defaults")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if paths_cls is not None:
            return load_stage_config(cls, paths_cls, args.config, rest)
        return load_config(cls, args.config, rest)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))


def pop_dry_run_options(argv: Sequence[str]) -> tuple:
    """Takes the dry-run flags (``--run.dry_run``, ``--run.gpu_memory_gb``, ``--run.world_size``: the fields of
    :class:`megatron_bliss.plan.DryRunOptions`) out of a stage's command line, so that they work for every stage
    whether or not its config has a ``run`` section.

    A bare ``--run.dry_run`` means true; ``--run.key=value`` and ``--run.key value`` both work.

    Returns:
        ``(DryRunOptions, the remaining arguments)``.

    Raises:
        ConfigError naming a bad value, or a memory or world size given without ``--run.dry_run``.
    """
    from megatron_bliss.plan import DryRunOptions

    names = {f"run.{f.name}" for f in dataclasses.fields(DryRunOptions)}
    taken, rest = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        key, eq, _ = arg[2:].partition("=")
        if not (arg.startswith("--") and key.replace("-", "_") in names):
            rest.append(arg)
        elif eq:
            taken.append(arg)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            taken += [arg, items[i + 1]]
            i += 1
        elif key.replace("-", "_") == "run.dry_run":
            taken.append(f"{arg}=true")
        else:
            raise ConfigError(f"override {arg!r} has no value")
        i += 1
    options = from_dict(DryRunOptions, parse_overrides(taken).get("run", {}), "run")
    if not options.dry_run and (options.gpu_memory_gb is not None or options.world_size is not None):
        raise ConfigError("run.gpu_memory_gb and run.world_size plan a dry run: add --run.dry_run=true")
    return options, rest


def run_stage(config_cls: type, paths_cls: type, run: str, argv: Sequence[str] | None, *, prog: str,
              description: str, log_level=None, prepare=None) -> int:
    """The body of every stage's ``main``: parse ``(config, paths)``, set up logging, run, tear down.

    Under ``torchrun`` each rank stops when its launcher dies (:func:`megatron_bliss.launch.watch_launcher`). When
    ``paths_cls`` names a ``lock_field`` (the stage's output directory), rank 0 locks that directory for the whole
    run, and a launch on a directory that a live job holds exits at once naming the holder.

    With ``--run.dry_run=true`` (:func:`pop_dry_run_options`) nothing runs: the stage's plan is printed
    (:func:`megatron_bliss.plan.dry_run`: models, memory per GPU, steps, tokens, FLOPs) and a plan over
    ``--run.gpu_memory_gb`` exits 1 naming the phase.

    Args:
        config_cls / paths_cls: the stage's root config and its ``paths`` section (see :func:`load_stage_config`).
        run: ``"module:function"`` of the stage's ``run_<stage>(config, paths)``, imported only after parsing so that
            ``--help`` and a usage error stay fast.
        argv: command-line arguments (default ``sys.argv[1:]``).
        prog / description: for the usage message.
        log_level: ``config -> level`` of the package logger (default INFO).
        prepare: ``config -> None`` called before the stage's modules are imported (process-level settings).

    Returns:
        The process exit code (0).
    """
    import importlib
    import sys
    import warnings

    from megatron_bliss import launch
    from megatron_bliss.log import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options, argv = pop_dry_run_options(argv)
    except ConfigError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    if options.dry_run:  # the configs' own checks (batch vs data-parallel size) read the launcher's world size
        os.environ["WORLD_SIZE"] = str(options.resolved_world_size())
    cfg, paths = parse_cli(config_cls, argv, description, prog=prog, paths_cls=paths_cls)
    if options.dry_run:
        from megatron_bliss.plan import dry_run

        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        try:
            return dry_run(cfg, paths, options, title=" ".join([prog, *argv]))
        except ValueError as exc:
            raise SystemExit(f"{prog}: error: {exc}") from None
    from megatron_bliss import parallel  # after parsing: --help and usage errors stay fast

    launch.watch_launcher()
    setup_logging(log_level(cfg) if log_level else "INFO")
    lock = None
    directory = getattr(paths, getattr(paths_cls, "lock_field", ""), None)
    if directory and parallel.launch_rank() == 0:
        try:
            lock = launch.DirectoryLock(directory).acquire()
        except launch.DirectoryLockedError as exc:
            raise SystemExit(f"{prog}: error: {exc}") from None
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    if prepare is not None:
        prepare(cfg)
    module, _, function = run.partition(":")
    try:
        getattr(importlib.import_module(module), function)(cfg, paths)
        parallel.destroy()
    finally:
        if lock is not None:
            lock.release()
    return 0
