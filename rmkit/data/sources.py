"""Eval and training sets as records: a recipe's sources, or files named on the command line.

Training (`rmkit train`, via `rmkit.train.rundir`), `rmkit eval` and `rmkit sweep` all resolve a
recipe's `data.eval` sets here, so every one of them scores exactly the same records (split,
limit, domain and score threshold applied the same way). Nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rmkit.data.records import Record
from rmkit.errors import RmkitError
from rmkit.io import sha256_file
from rmkit.recipe import Recipe, SourceSpec, load_recipe

RECIPE_FILE = "rmkit_recipe.yaml"  # the training recipe `rmkit train` saves beside a checkpoint's weights


@dataclass
class EvalSet:
    """Records to evaluate on, and where they came from (path, sha256, split, drops)."""

    name: str
    records: list[Record]
    source: dict[str, Any]

    def fingerprint(self) -> str:
        """sha256 of the records' texts and scores: two sets of one name with other records differ."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.prompt, list(r.responses), list(r.scores)], ensure_ascii=False).encode())
        return h.hexdigest()


class RecipeOwner(Protocol):
    """What `gather_sets` reads of a model folder (an `rmkit.inspection.Checkpoint` is one):
    its label, its kind ("rmkit" or "hf") and the training recipe saved beside it, if any."""

    label: str
    kind: str
    recipe: Path | None


# ---- a recipe's sources ----------------------------------------------------------------------

def load_spec(spec: SourceSpec, recipe: Recipe, role: str) -> tuple[list[Record], dict[str, Any]]:
    """One recipe source as records (split, limit, domain, score threshold applied) and its
    manifest entry; `role` ("data.train.0", "data.eval.NAME") names it in errors."""
    from rmkit.data.readers import load_source
    from rmkit.data.split import split_records

    path = Path(spec.path)
    if not path.exists():
        raise RmkitError(f"no such data file: {path}", where=role,
                         hint="paths are relative to the current folder; shipped recipes read "
                              "${RMKIT_DATA:-../shared/data}, so run from the repo root or export RMKIT_DATA")
    domain = spec.domain
    if domain is None and (spec.format == "dsp" or path.name.startswith("dsp")):
        domain = recipe.domain
    try:
        res = load_source(path, format=spec.format, domain=domain, listwise=spec.listwise)
    except RmkitError as e:
        if e.where is None:
            e.where = f"{role} ({path})"
        raise
    records = res.records
    dropped = Counter(res.dropped)
    if spec.split != "all":
        train, test = split_records(records, recipe.data.test_fraction, recipe.data.split_salt)
        records = train if spec.split == "train" else test
    if spec.limit is not None:
        records = records[: spec.limit]
    if recipe.loss.score_threshold > 0:
        kept = [r for r in records if any(r.scores[b] - r.scores[w] >= recipe.loss.score_threshold for b, w in r.pairs())]
        dropped["below score_threshold"] += len(records) - len(kept)
        records = kept
    if not records:
        raise RmkitError(f"no records left from {path} after split={spec.split}, limit={spec.limit}",
                         where=role, hint="use a larger slice, or split: all")
    info = {
        "path": str(path), "sha256": sha256_file(path) if path.is_file() else None,
        "format": res.format, "domain": domain, "split": spec.split, "limit": spec.limit,
        "rows_read": res.read, "dropped": dict(dropped), "records": len(records),
        "pairs": sum(len(r.pairs()) for r in records), "weight": spec.weight,
    }
    return records, info


def load_eval_sets(recipe: Recipe) -> dict[str, tuple[list[Record], dict[str, Any]]]:
    """Every `data.eval` set as training sees it (split, limit, domain, threshold applied), with
    its manifest entry; `rmkit eval` and `rmkit sweep` call this too, so all score the same records."""
    return {name: load_spec(spec, recipe, f"data.eval.{name}") for name, spec in recipe.data.eval.items()}


# ---- eval sets for `rmkit eval` --------------------------------------------------------------

def parse_data_arg(arg: str) -> tuple[Path, str]:
    """PATH[:NAME] -> (path, name); NAME defaults to the file stem. A path that exists as written
    is taken whole, so a ':' inside a file name still works."""
    if Path(arg).exists() or ":" not in arg:
        path, name = Path(arg), ""
    else:
        head, name = arg.rsplit(":", 1)
        path = Path(head)
    name = name or (path.name if path.is_dir() else path.stem)
    if not name:
        raise RmkitError(f"--data {arg!r} names no set", hint="write --data PATH or --data PATH:NAME")
    return path, name


def load_data_args(args: list[str], domain: str | None) -> list[EvalSet]:
    """Read every --data file (any format `load_source` reads); a bad file fails before scoring."""
    from rmkit.data.readers import load_source

    sets: list[EvalSet] = []
    for arg in args:
        path, name = parse_data_arg(arg)
        if any(s.name == name for s in sets):
            raise RmkitError(f"two --data sets are named '{name}'", where=f"--data {arg}",
                             hint="name them apart with PATH:NAME")
        if not path.exists():
            raise RmkitError(f"no such data file: {path}", where=f"--data {arg}",
                             hint="paths are relative to the current folder")
        try:
            res = load_source(path, domain=domain)
        except RmkitError as e:
            if e.where is None:
                e.where = f"--data {path}"
            raise
        source = {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None,
                  "format": res.format, "domain": domain, "split": "all", "limit": None,
                  "rows_read": res.read, "dropped": dict(res.dropped)}
        sets.append(EvalSet(name, res.records, source))
    return sets


def load_recipe_sets(owner: RecipeOwner) -> list[EvalSet]:
    """The model folder's own `data.eval` sets, resolved exactly as training resolved them."""
    if owner.recipe is None:
        what = "a plain model folder with no training recipe" if owner.kind == "hf" else f"missing {RECIPE_FILE}"
        raise RmkitError(f"{owner.label} has no eval sets of its own ({what})",
                         hint="pass the data: --data PATH[:NAME] (repeatable; DSP files also need --domain)")
    recipe = load_recipe(owner.recipe)
    if not recipe.data.eval:
        raise RmkitError(f"the recipe saved in {owner.label} has no data.eval sets",
                         hint="pass the data: --data PATH[:NAME] (repeatable)")
    try:
        loaded = load_eval_sets(recipe)
    except RmkitError as e:
        e.where = f"{owner.recipe}: {e.where}" if e.where else str(owner.recipe)
        e.hint = (e.hint + "; " if e.hint else "") + "or pass the data with --data PATH[:NAME]"
        raise
    return [EvalSet(name, recs, {k: v for k, v in info.items() if k != "weight"})
            for name, (recs, info) in loaded.items()]


def gather_sets(owners: list[RecipeOwner], data: list[str], domain: str | None) -> list[EvalSet]:
    """--data sets, or the union of the recipe sets of the folders that have a recipe (same
    name, other records -> the later one is renamed NAME@LABEL, never silently merged);
    every checkpoint is scored on every set."""
    if data:
        return load_data_args(data, domain)
    if domain is not None:
        raise RmkitError("--domain applies to --data files only",
                         hint="the recipe's eval sets carry their own domain; to score DSP data for another "
                              "domain pass --data PATH:NAME --domain D")
    sets: list[EvalSet] = []
    seen: dict[str, str] = {}
    with_recipe = [c for c in owners if c.recipe is not None] or owners[:1]
    for owner in with_recipe:
        for s in load_recipe_sets(owner):
            fp = s.fingerprint()
            if seen.get(s.name) == fp:
                continue
            if s.name in seen:
                s.name = f"{s.name}@{owner.label}"
            seen[s.name] = fp
            sets.append(s)
    return sets
