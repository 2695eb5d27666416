"""Which configuration each result row measured, and the entries a ranking ranks.

The rule (the design's "Results" contract):

1. A row's *configuration* is every option that changes its number except the seed: the
   ``config`` column's JSON (the feature spec without its dataset, and the method's options;
   written by the stages), flattened to dotted keys (``feature.layer``,
   ``knn.temperature``), plus the row's ``split`` and ``source`` (``own`` unless imported).
   Rows written before the column existed fall back to their ``feature_key``.
2. Safety net: rows of one setting and backbone with the same configuration and the same
   seed but different config hashes differ by something the configuration did not record;
   every row of that configuration then adds its config hash to it (never averaged).
3. Within a setting, a backbone's rows that differ by seed alone form one *cell*: its value
   is their mean and "seeds" their count.
4. A backbone's *varying keys* are the configuration keys on which two of its cells in one
   setting differ (a key one cell has and the other lacks counts). A cell's *variant* is its
   configuration on those keys (a key it lacks, e.g. a kNN temperature on a linear row, is
   not applicable: ``None``).
5. A backbone's *entries* are its variants that no other variant of it extends (agrees on
   every key it has and has more). A cell belongs to every entry that extends it or equals
   it; an entry with two cells in one setting takes the most specific (most keys), then the
   first by label. A backbone without varying keys has one entry, named by its label; the
   others are named ``label · what differs`` (``resnet50 · layer3 · avg``).

``prefer`` (``KEY=VALUE``) picks a configuration first: for each backbone with a row whose
``KEY`` is ``VALUE``, its rows with another value of ``KEY`` are left out (rows without
``KEY`` stay). ``KEY`` is a dotted key or its last part(s); hashes match by prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bob_cache.errors import BobCacheError

HASH_KEYS = ("feature_key", "config_hash")
SHOWN_BARE = ("layer", "pool")  # shown as their value alone: `resnet50 · layer3 · avg`
SEP = " · "


class RankingOptionError(BobCacheError, ValueError):
    """A ranking or report option that the results cannot honour (``--prefer``, bootstrap)."""


@dataclass
class Configurations:
    """The rows with their cell, and the entries the cells belong to."""

    rows: pd.DataFrame  # the input rows + `cell` (a cell's label) and `configuration`
    entries: pd.DataFrame  # entry, backbone, configuration (what differs; "" alone)
    membership: pd.DataFrame  # cell, entry, specificity
    varying: dict[str, list[str]]  # backbone → its varying keys (display names)
    chosen: list[dict[str, Any]] = field(default_factory=list)  # what --prefer picked
    left_out: pd.DataFrame = field(default_factory=pd.DataFrame)  # rows --prefer left out


def parse_prefer(items: Iterable[str] | None) -> list[tuple[str, str]]:
    """``["layer=layer3"]`` → ``[("layer", "layer3")]``; a malformed item is an error."""
    parsed = []
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise RankingOptionError(
                f"--prefer expects KEY=VALUE (e.g. layer=layer3, temperature=0.1); got "
                f"'{item}'. `bob-cache results --long` shows each row's config."
            )
        parsed.append((key.strip(), value.strip()))
    return parsed


def row_configs(frame: pd.DataFrame) -> list[dict[str, str]]:
    """Each row's configuration (step 1), as flat ``{dotted key: text}``."""
    configs = []
    columns = [_text(frame, c) for c in ("config", "feature_key", "split", "source")]
    parsed = {text: _parse(text) for text in set(columns[0]) if text}
    for config, feature_key, split, source in zip(*columns, strict=True):
        fields = dict(parsed[config]) if config else {}
        if not fields and feature_key:
            fields = {"feature_key": feature_key}
        fields["split"] = split
        fields["source"] = source or "own"
        configs.append(fields)
    return configs


def resolve_configurations(
    rows: pd.DataFrame, keys: Sequence[str], *, prefer: Sequence[tuple[str, str]] = ()
) -> Configurations:
    """Cells and entries of ``rows`` (one metric per setting), settings keyed by ``keys``."""
    rows = rows.reset_index(drop=True)
    configs = _with_hash_net(rows, row_configs(rows), keys)
    configs, rows, chosen, left_out = _apply_prefer(rows, configs, prefer)
    varying = _varying_keys(rows, configs, keys)
    names = _display_names(sorted({k for ks in varying.values() for k in ks}))
    variants = [
        tuple((k, c.get(k)) for k in varying[b])
        for b, c in zip(rows["backbone"].astype(str), configs, strict=True)
    ]
    cells = [_label(b, v, names) for b, v in zip(rows["backbone"].astype(str), variants,
                                                 strict=True)]  # fmt: skip
    out = rows.assign(cell=cells, configuration=[_label("", v, names) for v in variants])
    entries, membership = _entries(rows["backbone"].astype(str), variants, names)
    shown = {b: [names[k] for k in ks] for b, ks in varying.items() if ks}
    return Configurations(out, entries, membership, shown, chosen, left_out)


def _with_hash_net(
    rows: pd.DataFrame, configs: list[dict[str, str]], keys: Sequence[str]
) -> list[dict[str, str]]:
    """Step 2: add the config hash where one configuration has two hashes for one seed."""
    if rows.empty or "config_hash" not in rows:
        return configs
    frame = rows[[*keys, "backbone", "seed", "config_hash"]].astype(str)
    frame["_config"] = [_canonical(c) for c in configs]
    group = [*keys, "backbone", "_config"]
    hashes = frame.groupby([*group, "seed"], sort=False)["config_hash"].transform("nunique")
    clash = frame.assign(_clash=hashes > 1).groupby(group, sort=False)["_clash"].transform("any")
    return [
        {**c, "config_hash": h} if bad else c
        for c, h, bad in zip(configs, frame["config_hash"], clash, strict=True)
    ]


def _apply_prefer(
    rows: pd.DataFrame, configs: list[dict[str, str]], prefer: Sequence[tuple[str, str]]
) -> tuple[list[dict[str, str]], pd.DataFrame, list[dict[str, Any]], pd.DataFrame]:
    chosen: list[dict[str, Any]] = []
    dropped = pd.Series(False, index=rows.index)
    for key, value in prefer:
        full = _match_key(key, configs)
        has = pd.Series([full in c for c in configs], index=rows.index)
        hit = pd.Series([_same(full, c.get(full), value) for c in configs], index=rows.index)
        if not (hit & ~dropped).any():
            present = sorted({c[full] for c, d in zip(configs, dropped, strict=True)
                              if full in c and not d})  # fmt: skip
            raise RankingOptionError(
                f"--prefer {key}={value}: no row has {full}={value}. Values present: "
                f"{', '.join(present) or 'none'}."
            )
        for backbone, mine in rows.groupby("backbone", sort=True).groups.items():
            wins = hit[mine] & ~dropped[mine]
            losers = has[mine] & ~hit[mine] & ~dropped[mine]
            if wins.any() and losers.any():
                lost = sorted({configs[i][full] for i in losers[losers].index})
                dropped[losers[losers].index] = True
                chosen.append({"prefer": f"{key}={value}", "backbone": str(backbone),
                               "kept": int(wins.sum()), "left_out": int(losers.sum()),
                               "values_left_out": ", ".join(lost)})  # fmt: skip
    kept = [c for c, d in zip(configs, dropped, strict=True) if not d]
    return kept, rows[~dropped].reset_index(drop=True), chosen, rows[dropped]


def _match_key(key: str, configs: list[dict[str, str]]) -> str:
    """The dotted key ``key`` names: itself, else the one key ending in ``.key``."""
    present = sorted({k for c in configs for k in c})
    if key in present:
        return key
    found = [k for k in present if k.endswith(f".{key}")]
    if len(found) == 1:
        return found[0]
    if found:
        raise RankingOptionError(
            f"--prefer {key}=...: '{key}' names several keys ({', '.join(found)}); "
            "give the dotted one."
        )
    leaves = sorted({k.rsplit(".", 1)[-1] for k in present})
    raise RankingOptionError(
        f"--prefer {key}=...: no row has a configuration key '{key}'. Keys present: "
        f"{', '.join(leaves) or 'none'} (dotted: `bob-cache results --long` shows `config`)."
    )


def _same(key: str, have: str | None, want: str) -> bool:
    if have is None:
        return False
    if key.rsplit(".", 1)[-1] in HASH_KEYS:
        return have.startswith(want)
    return have == want


def _varying_keys(
    rows: pd.DataFrame, configs: list[dict[str, str]], keys: Sequence[str]
) -> dict[str, list[str]]:
    """Step 4: per backbone, the keys on which two of its cells of one setting differ."""
    varying: dict[str, set[str]] = {str(b): set() for b in rows["backbone"].unique()}
    groups = rows.groupby([*keys, "backbone"], sort=False).indices if len(rows) else {}
    for key, index in groups.items():
        distinct = {_canonical(configs[i]): configs[i] for i in index}
        if len(distinct) < 2:
            continue
        found = list(distinct.values())
        every = set().union(*found)
        varying[str(key[-1])] |= {k for k in every if len({c.get(k) for c in found}) > 1}
    return {b: sorted(ks, key=_key_order) for b, ks in varying.items()}


def _entries(
    backbones: pd.Series, variants: list[tuple], names: dict[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 5: maximal variants per backbone, and each cell's entries."""
    entries, links = [], []
    by_backbone: dict[str, set[tuple]] = {}
    for b, v in zip(backbones, variants, strict=True):
        by_backbone.setdefault(b, set()).add(v)
    for b, mine in sorted(by_backbone.items()):
        maximal = [v for v in mine if not any(_extends(w, v) for w in mine if w != v)]
        maximal.sort(key=lambda v: _label(b, v, names))
        for v in maximal:
            entries.append({"entry": _label(b, v, names), "backbone": b,
                            "configuration": _label("", v, names)})  # fmt: skip
        for v in mine:
            for w in maximal:
                if w == v or _extends(w, v):
                    links.append({"cell": _label(b, v, names), "entry": _label(b, w, names),
                                  "specificity": sum(x is not None for _, x in v)})  # fmt: skip
    return (pd.DataFrame(entries, columns=["entry", "backbone", "configuration"]),
            pd.DataFrame(links, columns=["cell", "entry", "specificity"]))  # fmt: skip


def _extends(w: tuple, v: tuple) -> bool:
    """Whether variant ``w`` agrees with ``v`` on every key ``v`` has."""
    return all(x is None or x == y for (_, x), (_, y) in zip(v, w, strict=True))


def _label(backbone: str, variant: tuple, names: dict[str, str]) -> str:
    parts = [_part(names[k], x) for k, x in variant if x is not None]
    return SEP.join([p for p in (backbone, *parts) if p])


def _part(name: str, value: str) -> str:
    if name.rsplit(".", 1)[-1] in HASH_KEYS:
        value = value[:8]
    return value if name in SHOWN_BARE else f"{name}={value}"


def _display_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest ending that no other key shares."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith(f".{tail}")) for o in keys):
                break
        names[key] = tail
    return names


def _key_order(key: str) -> tuple[int, str]:
    leaf = key.rsplit(".", 1)[-1]
    return (SHOWN_BARE.index(leaf) if leaf in SHOWN_BARE else len(SHOWN_BARE), key)


def _parse(text: str) -> dict[str, str]:
    """A ``config`` cell's flat fields; text that is not a JSON object is one field."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return _flatten(value) if isinstance(value, dict) and value else {"config": text}


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {prefix.rstrip("."): text}


def _canonical(config: dict[str, str]) -> str:
    return json.dumps(config, sort_keys=True)


def _text(frame: pd.DataFrame, column: str) -> list[str]:
    if column not in frame:
        return [""] * len(frame)
    values = frame[column].astype(object).where(frame[column].notna(), "")
    return [str(v) for v in values]
