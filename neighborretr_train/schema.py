"""Checks of the composed config before anything is built or read: unknown keys (also those added with `+`),
wrong types and unknown names, each reported in one line with the fix.

A node with a `_target_` is checked against its target's signature and type hints (the target is the schema,
so nothing is written twice); the nodes without one (eval, logger, the top level) against the dataclasses
below. Value ranges are checked by the constructors themselves when the recipe builds them (before any
file is opened).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from neighborretr.eval.hubness import METHODS
from neighborretr.eval.metrics import V2T_PROTOCOLS

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """Settings that cannot work together."""


class SchemaError(ConfigError):
    """A config key or value that cannot be right."""


@dataclasses.dataclass
class EvalSettings:
    """configs/eval/*.yaml (read by the recipe's Evaluator)."""

    chunk_size: int = 256
    normalizations: list[str] = dataclasses.field(default_factory=lambda: ["none"])
    k: int = 10
    query_bank_size: int | None = 10000
    gallery_bank_size: int | None = 2000
    bank_seed: int = 0
    v2t_protocol: str = "best_caption"
    as_published: bool = False
    hub_report: bool = True

    def __post_init__(self):
        for name in ("chunk_size", "k", "query_bank_size", "gallery_bank_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SchemaError(f"eval.{name}={value} must be >= 1")
        unknown = sorted(set(self.normalizations) - set(METHODS))
        if unknown:
            raise SchemaError(f"eval.normalizations: unknown {unknown}; choose from {', '.join(METHODS)}")
        if self.v2t_protocol not in V2T_PROTOCOLS:
            raise SchemaError(f"eval.v2t_protocol={self.v2t_protocol!r}: choose {' or '.join(V2T_PROTOCOLS)}")


@dataclasses.dataclass
class LoggerSettings:
    """configs/logger/*.yaml: wandb through Accelerate's tracker, or none."""

    name: str = "none"
    project: str | None = None
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.name not in ("none", "wandb"):
            raise SchemaError(f"logger.name={self.name!r}: choose none or wandb (logger=none / logger=wandb)")
        if self.mode not in ("online", "offline", "disabled"):
            raise SchemaError(f"logger.mode={self.mode!r}: choose online, offline or disabled")


@dataclasses.dataclass
class EvalTrainer:
    """neighborretr-eval's `trainer` node: how to run, not what to train."""

    mixed_precision: str | None = None
    cpu: bool = False


@dataclasses.dataclass
class CacheSettings:
    """configs/cache_frames.yaml's `cache` node (read by neighborretr-cache-frames)."""

    splits: list[str] = dataclasses.field(default_factory=lambda: ["train", "val", "test"])
    workers: int | None = None
    max_candidates: int = 256
    shard_gb: float = 4.0
    compress: typing.Literal["none", "jpeg"] = "none"
    quality: int = 95
    progress: bool = True

    def __post_init__(self):
        for name in ("workers", "max_candidates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SchemaError(f"cache.{name}={value} must be >= 1")
        if not self.shard_gb > 0:
            raise SchemaError(f"cache.shard_gb={self.shard_gb} must be > 0")
        if not 1 <= self.quality <= 100:
            raise SchemaError(f"cache.quality={self.quality} must be in 1..100")


# Overrides of the saved run's data settings (neighborretr-eval): the data target's keys, each may be null.
DATA_OVERRIDES = ("overrides", "neighborretr.data.module.VideoTextData")

# The top-level keys of each recipe's config and their types; a node's schema is "target" (its `_target_`), a
# dataclass, or DATA_OVERRIDES.
# Keys every recipe has: where its outputs go and the seed.
_COMMON = {"output_root": str, "output_dir": str | None, "seed": int}
_RUN = {"eval": EvalSettings, "logger": LoggerSettings, "run_name": str, **_COMMON}
TOP_LEVEL = {
    "train": {**dict.fromkeys(("data", "model", "loss", "optim", "scheduler", "trainer"), "target"), **_RUN},
    "eval": {
        "ckpt": str,
        "split": typing.Literal["test", "val"],
        "data": DATA_OVERRIDES,
        "trainer": EvalTrainer,
        **_RUN,
    },
    "cache": {
        **dict.fromkeys(("data", "model", "loss", "optim", "scheduler", "trainer"), "target"),
        **_RUN,
        "cache": CacheSettings,
    },
    "validate": {"data": "target", "splits": list[str], "workers": int | None, "max_frames": int | None, **_COMMON},
}


def _type_ok(value, hint) -> bool:
    """Whether a config value fits a type hint (ints pass for floats, strings for paths; unknown hints pass)."""
    if hint in (typing.Any, inspect.Parameter.empty) or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, str | Path)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple | ListConfig):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return len(set(args)) != 1 or all(_type_ok(v, args[0]) for v in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict | DictConfig)
    return True  # a class we do not check (e.g. a callable)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, "a path" if hint is Path else str(hint).replace("typing.", ""))


def _check_keys(where: str, node: Mapping, hints: dict, open_ended: bool = False) -> None:
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key not in hints:
            if open_ended:
                continue
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else f"; known keys: {', '.join(sorted(hints))}"
            raise SchemaError(f"{where}.{key}: unknown key{hint}")
        if isinstance(value, str) and value == "???":
            raise SchemaError(f"{where}.{key} must be set")
        if not _type_ok(value, hints[key]):
            raise SchemaError(
                f"{where}.{key}={value!r}: expected {_describe(hints[key])}{_quote_hint(where, key, value, hints[key])}"
            )


def _quote_hint(where: str, key: str, value, hint) -> str:
    """Hydra reads `run_name=123` as a number; say how to pass it as a string."""
    if isinstance(value, int | float) and not isinstance(value, bool) and _type_ok(str(value), hint):
        name = f"{where}.{key}" if where else key
        return f" (to pass a number as a string, quote it: '{name}=\"{value}\"')"
    return ""


def _target_hints(target: str) -> tuple[dict, bool]:
    """(type hint of each parameter, whether the target takes **kwargs)."""
    obj = get_object(target)
    init = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(obj).parameters
    try:
        resolved = typing.get_type_hints(init)
    except Exception:  # hints that do not resolve are not checked
        resolved = {}
    hints = {n: resolved.get(n, p.annotation) for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    return hints, any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_node(where: str, node: DictConfig, schema) -> None:
    if not isinstance(node, DictConfig):
        raise SchemaError(f"{where}: expected a group of settings, got {node!r}")
    if isinstance(schema, tuple):  # overrides of a target's settings: its keys, any of them null
        hints, _ = _target_hints(schema[1])
        _check_keys(where, node, {k: h | None for k, h in hints.items() if h is not inspect.Parameter.empty})
        return
    if schema == "target":
        if "_target_" not in node:
            raise SchemaError(f"{where}: has no _target_ (pick one of the configs/{where}/*.yaml)")
        try:
            hints, open_ended = _target_hints(node._target_)
        except (ImportError, AttributeError, ValueError) as err:
            raise SchemaError(f"{where}._target_={node._target_}: cannot be imported ({err})") from err
        _check_keys(where, node, hints, open_ended)
        return
    hints = typing.get_type_hints(schema)
    _check_keys(where, node, hints)
    schema(**OmegaConf.to_container(node, resolve=True))  # ranges and names (__post_init__)


def check_config(cfg: DictConfig, recipe: str) -> None:
    """Raises SchemaError for the first unknown key, wrong type or unknown name in `cfg` (the composed config of
    `recipe`); interpolations are resolved first, so a broken one is reported too."""
    try:
        OmegaConf.resolve(copy := OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))
    except Exception as err:  # an interpolation that does not resolve
        raise SchemaError(f"the config does not resolve: {err}") from err
    top = TOP_LEVEL[recipe]
    for key in copy:
        if key not in top:
            close = difflib.get_close_matches(key, list(top), n=1)
            raise SchemaError(f"{key}: unknown key" + (f"; did you mean {close[0]}?" if close else ""))
    missing = [key for key in top if key not in copy]
    if missing:
        raise SchemaError(f"{', '.join(missing)}: missing from the config")
    nodes = {k: v for k, v in top.items() if v == "target" or isinstance(v, tuple) or dataclasses.is_dataclass(v)}
    for key, schema in top.items():  # plain values first: the nodes interpolate them (data.seed: ${seed})
        if key not in nodes and not _type_ok(copy[key], schema):
            raise SchemaError(
                f"{key}={copy[key]!r}: expected {_describe(schema)}{_quote_hint('', key, copy[key], schema)}"
            )
    for key, schema in nodes.items():
        check_node(key, copy[key], schema)
