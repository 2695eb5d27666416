"""Battle suite files: backbones × datasets × tasks, in YAML, validated before any work.

A suite names the backbones (with their extraction options and display metadata), the
datasets (a ``--data`` source each, and their splits) and the tasks (kinds registered by the
battle stage, each with its options). Loading checks the whole file and reports every
problem at once, each with its key path, line and the valid choices.

``${NAME}`` in any string is replaced by the environment variable ``NAME`` (an error names
it when unset); relative paths resolve against the suite file's folder. Only fields that are
paths are resolved (each model's ``path_fields``: a dataset's ``data``, a backbone's
``weights``); a backbone's ``data``, ``method``, ``family`` and ``params`` are display
metadata, kept as written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bob_cache.errors import BobCacheError, did_you_mean

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A --data value's kind prefixes (torchvision:Flowers102:, imagenet-r:, wds:); the rest is a path.
_PREFIX = re.compile(r"^(?:[A-Za-z][A-Za-z0-9_.+-]*:)+")
_PATTERN_CHARS = "{}*?["
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class SuiteError(BobCacheError, ValueError):
    """A suite file that cannot run: every problem, each with its line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# How a suite says a backbone saw no pretraining data (``data: none``), case-insensitive.
NO_DATA = ("none", "null", "-", "")


def is_no_data(value: Any) -> bool:
    """Whether a backbone's ``data`` says "no pretraining data" (``none``)."""
    return isinstance(value, str) and value.strip().lower() in NO_DATA


class BackboneSpec(_Model):
    """One contender: what to extract with, and how the report shows it. ``family``,
    ``method``, ``data`` (its pretraining data's name, ``none`` for random init) and
    ``params`` are display metadata, never paths."""

    path_fields: ClassVar[tuple[str, ...]] = ("weights",)

    name: str = Field(description="registry name, timm name or tv:<model>")
    label: str | None = Field(None, description="display name in the report")
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    layers: tuple[str, ...] = ("final",)
    pool: str = "default"
    image_size: int | None = Field(None, ge=16)
    precision: str = "auto"
    dtype: str = "float16"
    decode: str = "pil"
    family: str | None = None
    method: str | None = None
    data: str | None = Field(
        None, description="pretraining data, e.g. ImageNet-1k (a name, not a path); none"
    )
    params: int | None = Field(None, ge=0)

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in PRECISIONS:
            raise ValueError(f"expected one of {', '.join(PRECISIONS)}")
        return value

    @model_validator(mode="after")
    def _random_init_saw_no_data(self) -> BackboneSpec:
        if self.random_init and self.data is not None and not is_no_data(self.data):
            raise ValueError(
                f"a random_init backbone saw no pretraining data, but data is '{self.data}'; "
                "drop `data` or write `data: none`"
            )
        return self

    @property
    def display(self) -> str:
        return self.label or self.name


class DatasetSpec(_Model):
    """One dataset: a ``--data`` source, and the splits the tasks use."""

    path_fields: ClassVar[tuple[str, ...]] = ("data", "gnd", "val_data", "test_data")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    data: str
    limit: int | None = Field(None, ge=1)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    retrieval_split: str = "train"
    split_fractions: tuple[float, float, float] | None = Field(
        None,
        description="train, val, test fractions for a labelled source without splits "
        "(default 0.6, 0.2, 0.2; split by id hash, stratified by class)",
    )
    gnd: str | None = None
    shift: tuple[str, ...] = Field((), description="datasets of this suite: shifted copies")
    detect: tuple[str, ...] = Field((), description="datasets of this suite: OOD to detect")
    evaluate: bool = Field(True, description="false: only extracted (a shift or detect set)")
    kind: str = Field(
        "images",
        pattern="^(images|coco|segmentation)$",
        description="images: extracted and probed; coco (a COCO json, the train split, with "
        "val_data): fine-tuned only; segmentation (a folder with images/ and masks/, or with "
        "train/ val/ test/ folders of them): fine-tuned, and probed from dense grids",
    )
    val_data: str | None = Field(None, description="coco/segmentation: the val json or folder")
    test_data: str | None = Field(None, description="coco/segmentation: the test json or folder")

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float] | None) -> Any:
        from bob_cache.data.splits import SplitFractions

        if value is not None:
            try:
                SplitFractions(*value)
            except BobCacheError:
                raise ValueError(
                    "expected three fractions for train, val, test in [0, 1] that sum to 1, "
                    "train above 0, e.g. [0.6, 0.2, 0.2]"
                ) from None
        return value

    @model_validator(mode="after")
    def _fine_tuning_data(self) -> DatasetSpec:
        if self.kind == "coco" and self.val_data is None:
            raise ValueError("a coco dataset needs val_data (its val json)")
        if self.kind == "images" and (self.val_data or self.test_data):
            raise ValueError("val_data/test_data are for coco or segmentation datasets; an "
                             "images dataset takes its splits from data")  # fmt: skip
        return self

    @property
    def extractable(self) -> bool:
        """Whether the battle extracts features from it (image sources only)."""
        return self.kind == "images"


class TaskSpec(BaseModel):
    """One task kind with its options (checked by the kind's own schema)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str
    datasets: tuple[str, ...] | None = None  # default: every dataset
    backbones: tuple[str, ...] | None = None  # default: every backbone (labels or names)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunOptions(_Model):
    """Options shared by every job of a suite."""

    device: str = "auto"
    batch_size: int = Field(64, ge=1)
    workers: int | None = Field(None, ge=0)
    shard_rows: int | None = Field(None, ge=1)
    runs: str = Field("bob-runs", description="folder of the fine-tuning runs' checkpoints")


class SuiteModel(_Model):
    name: str
    description: str = ""
    store: str | None = None
    results: str | None = None
    backbones: tuple[BackboneSpec, ...] = Field(min_length=1)
    datasets: tuple[DatasetSpec, ...] = Field(min_length=1)
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    options: RunOptions = RunOptions()


@dataclass(frozen=True)
class Suite:
    """A loaded, checked suite."""

    model: SuiteModel
    path: Path
    task_options: dict[int, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def backbones(self) -> tuple[BackboneSpec, ...]:
        return self.model.backbones

    @property
    def datasets(self) -> tuple[DatasetSpec, ...]:
        return self.model.datasets

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.model.tasks

    @property
    def options(self) -> RunOptions:
        return self.model.options

    def datasets_of(self, task: TaskSpec) -> list[DatasetSpec]:
        """The datasets ``task`` runs on: those it names, else every one with ``evaluate``."""
        wanted = task.datasets
        return (
            [d for d in self.datasets if d.name in wanted]
            if wanted is not None
            else [d for d in self.datasets if d.evaluate]
        )

    def runs_on(self, task: TaskSpec, backbone: BackboneSpec) -> bool:
        """Whether ``task`` runs for ``backbone``: it names it (label or name), or names none."""
        return task.backbones is None or bool(
            {backbone.display, backbone.name} & set(task.backbones)
        )


# A task kind's checker: its options → (parsed options, problems as (key path, message)).
TaskChecker = Callable[[dict[str, Any]], tuple[Any, list[tuple[tuple[Any, ...], str]]]]


def load_suite(
    path: str | Path,
    *,
    task_kinds: dict[str, TaskChecker],
    check_backbone: Callable[[BackboneSpec], str | None] | None = None,
) -> Suite:
    """Read and check a suite file; every problem is reported at once.

    Args:
        path: the YAML file.
        task_kinds: registered task kinds and the checker of each one's options.
        check_backbone: returns a problem (e.g. unknown name, with close matches) or None.

    Raises:
        SuiteError: the file is missing or not YAML, or any value is wrong.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise SuiteError(
            f"Suite file '{path}' does not exist. Pass a YAML suite, e.g. suites/demo.yaml."
        )
    try:
        node = yaml.compose(file.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"Suite '{path}' is not valid YAML: {exc}") from exc
    if node is None:
        raise SuiteError(f"Suite '{path}' is empty. See suites/demo.yaml for the layout.")
    lines = _lines(node)
    problems: list[tuple[tuple[Any, ...], str]] = []
    raw = _expand(yaml.safe_load(file.read_text()), (), problems)
    model: SuiteModel | None = None
    try:
        model = SuiteModel.model_validate(raw)
    except ValidationError as exc:
        problems += [(tuple(e["loc"]), _message(e, raw)) for e in exc.errors()]
    # Each item is also checked on its own, so one bad entry hides no other problem.
    section = raw if isinstance(raw, dict) else {}
    backbones = _parse_items(section.get("backbones"), BackboneSpec, file.parent)
    datasets = _parse_items(section.get("datasets"), DatasetSpec, file.parent)
    tasks = _parse_items(section.get("tasks"), TaskSpec, file.parent)
    task_options: dict[int, Any] = {}
    for i, task in tasks.items():
        if task.kind not in task_kinds:
            hint = did_you_mean(task.kind, task_kinds)
            choices = ", ".join(sorted(task_kinds))
            problems.append((("tasks", i, "kind"), f"unknown task kind '{task.kind}'.{hint} "
                             f"Valid kinds: {choices}"))  # fmt: skip
            continue
        parsed, found = task_kinds[task.kind](task.options)
        task_options[i] = parsed
        problems += [(("tasks", i, *loc), msg) for loc, msg in found]
    for i, backbone in backbones.items():
        problem = check_backbone(backbone) if check_backbone else None
        if problem:
            problems.append((("backbones", i, "name"), problem))
    for i, dataset in datasets.items():
        for key in ("data", "val_data", "test_data"):
            problem = _check_data(getattr(dataset, key))
            if problem:
                problems.append((("datasets", i, key), problem))
    problems += _check_names(
        list(backbones.values()),
        list(datasets.values()),
        tasks,
        raw_count=len(section.get("datasets") or []),
    )
    if model is not None:
        model = model.model_copy(update={
            "backbones": tuple(backbones[i] for i in range(len(model.backbones))),
            "datasets": tuple(datasets[i] for i in range(len(model.datasets))),
        })  # fmt: skip
    if problems:
        listed = "\n".join(f"  - {_where(loc, lines)}: {msg}" for loc, msg in problems)
        raise SuiteError(
            f"Suite '{path}' has {len(problems)} problem(s); nothing was run:\n{listed}"
        )
    assert model is not None
    return Suite(model=model, path=file, task_options=task_options)


def _parse_items(items: Any, model: type[BaseModel], base: Path) -> dict[int, Any]:
    """The entries of a list section that parse on their own (others are reported by the
    whole-file validation), with their paths resolved against the suite's folder."""
    out = {}
    for i, item in enumerate(items if isinstance(items, list) else []):
        try:
            parsed = model.model_validate(item)
        except ValidationError:
            continue
        paths: tuple[str, ...] = getattr(model, "path_fields", ())  # only real paths
        fields = {k: _resolve(getattr(parsed, k), base) for k in paths}
        out[i] = parsed.model_copy(update=fields) if fields else parsed
    return out


def _check_names(
    backbones: list[BackboneSpec],
    datasets: list[DatasetSpec],
    tasks: dict[int, TaskSpec],
    *,
    raw_count: int,
) -> list[tuple[tuple[Any, ...], str]]:
    problems = []
    names = [d.name for d in datasets]
    for i, task in tasks.items():
        for j, name in enumerate(task.datasets or ()):
            if name not in names and len(names) == raw_count:
                hint = did_you_mean(name, names)
                problems.append((("tasks", i, "datasets", j), f"unknown dataset '{name}'.{hint} "
                                 f"The suite's datasets: {', '.join(names)}"))  # fmt: skip
    for i, dataset in enumerate(datasets):
        for role in ("shift", "detect"):
            for j, name in enumerate(getattr(dataset, role)):
                if name == dataset.name or (name not in names and len(names) == raw_count):
                    why = (
                        "is this dataset itself"
                        if name == dataset.name
                        else (f"is not a dataset of this suite.{did_you_mean(name, names)}")
                    )
                    problems.append((("datasets", i, role, j), f"'{name}' {why} List the "
                                     "shifted or OOD data under datasets (with evaluate: false "
                                     "to only extract it) and name it here."))  # fmt: skip
    known = {b.display for b in backbones} | {b.name for b in backbones}
    for i, task in tasks.items():
        for j, name in enumerate(task.backbones or ()):
            if name not in known:
                problems.append((("tasks", i, "backbones", j), f"unknown backbone '{name}'."
                                 f"{did_you_mean(name, known)} The suite's backbones: "
                                 f"{', '.join(sorted(known))}"))  # fmt: skip
    for what, items in (("backbones", [b.display for b in backbones]), ("datasets", names)):
        seen = set()
        for i, item in enumerate(items):
            if item in seen:
                problems.append(((what, i), f"'{item}' appears twice; give one a `label`"))
            seen.add(item)
    return problems


def _check_data(data: str | None) -> str | None:
    if data is None or data.startswith("builtin:") or "://" in data or _VAR.search(data):
        return None  # an unset variable is reported already
    prefix, path = _split_prefix(data)
    if any(c in path for c in _PATTERN_CHARS):
        return None  # a shard pattern or options: the source checks them when it lists
    if not Path(path).exists():
        if prefix:
            return f"the folder '{path}' of data source '{data}' does not exist"
        return (f"data source '{data}' does not exist (a folder, .csv/.jsonl manifest, "
                "builtin:, or a KIND:ROOT source of `bob-cache datasets`)")  # fmt: skip
    return None


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None or value.startswith("builtin:") or "://" in value or _VAR.search(value):
        return value  # (an unset variable is reported already)
    prefix, path = _split_prefix(value)
    p = Path(path).expanduser()
    return prefix + str(p if p.is_absolute() else (base / p).resolve())


def _split_prefix(value: str) -> tuple[str, str]:
    """``(KIND:...:, path)`` of a prefixed --data value (``torchvision:Flowers102:data/f`` →
    ``torchvision:Flowers102:``, ``data/f``); a plain path has no prefix."""
    match = _PREFIX.match(value)
    return (match.group(0), value[match.end() :]) if match else ("", value)


def _expand(value: Any, loc: tuple[Any, ...], problems: list) -> Any:
    if isinstance(value, str):
        missing = [v for v in _VAR.findall(value) if v not in os.environ]
        for name in missing:
            problems.append((loc, f"environment variable ${{{name}}} is not set; export it"))
        return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _expand(v, (*loc, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*loc, i), problems) for i, v in enumerate(value)]
    return value


def _lines(node: yaml.Node, loc: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Line (1-based) of every key path in a composed YAML document."""
    out = {loc: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            out.update(_lines(child, (*loc, key.value)))
            out[(*loc, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            out.update(_lines(child, (*loc, i)))
    return out


def _where(loc: Iterable[Any], lines: dict[tuple[Any, ...], int]) -> str:
    loc = tuple(loc)
    path = ".".join(str(p) for p in loc) or "(top level)"
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"{path} (line {lines[loc[:n]]})"
    return path


_SECTIONS: dict[str, type[BaseModel]] = {
    "backbones": BackboneSpec,
    "datasets": DatasetSpec,
    "options": RunOptions,
}


def _message(error: Any, raw: Any) -> str:
    kind, msg, loc = error["type"], error["msg"], tuple(error["loc"])
    if kind == "extra_forbidden":
        model = _SECTIONS.get(str(loc[0]), SuiteModel) if len(loc) > 1 else SuiteModel
        hint = did_you_mean(str(loc[-1]), model.model_fields)
        return f"unknown key.{hint} Valid keys: {', '.join(model.model_fields)}"
    if kind == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ")
