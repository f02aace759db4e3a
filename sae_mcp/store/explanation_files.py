"""Explanation files to import: Neuronpedia's export (downloaded, or a saved copy) and plain JSON/JSONL/CSV.

Every format normalises to rows of (feature, description, explainer). A Neuronpedia row names the SAE it explains
(modelId + layer, e.g. 'gpt2-small' + '7-res-jb'); rows that name another SAE than the target's Neuronpedia id are
refused, so explanations of one SAE are never filed under another.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from sae_mcp.errors import InvalidInput, LoadError

NEURONPEDIA_EXPORT_URL = "https://www.neuronpedia.org/api/explanation/export"

FEATURE_KEYS = ("feature", "index", "featureIndex", "feature_index")
DESCRIPTION_KEYS = ("description", "explanation", "label")
EXPLAINER_KEYS = ("explanationModelName", "explainer", "typeName")


def _pick(obj: dict, keys: Sequence[str]):
    for k in keys:
        if k in obj and obj[k] is not None and obj[k] != "":
            return obj[k]
    return None


def check_neuronpedia_ids(records: Sequence[dict], neuronpedia_id: str | None, sae_name: str = "the SAE",
                          where: str = "") -> None:
    """Refuse rows of Neuronpedia's export (modelId + layer, e.g. 'gpt2-small' + '7-res-jb') that belong to
    another Neuronpedia SAE than `neuronpedia_id` ('gpt2-small/7-res-jb'). Nothing to check when either side is
    unknown (no id for the SAE, or rows without modelId/layer: a plain {feature, description} file)."""
    if not neuronpedia_id:
        return
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict) or not rec.get("modelId") or not rec.get("layer"):
            continue
        theirs = f"{rec['modelId']}/{rec['layer']}"
        if theirs != neuronpedia_id:
            raise InvalidInput(
                f"{where}row {i} explains a feature of Neuronpedia SAE {theirs} (modelId {rec['modelId']!r}, "
                f"layer {rec['layer']!r}), but {sae_name} is {neuronpedia_id} on Neuronpedia: import the file into "
                f"the SAE it is for (--sae), or pass --force if they are the same SAE under another name"
            )


def normalise_rows(records: Iterable[dict], d_sae: int | None = None, where: str = "",
                   neuronpedia_id: str | None = None, sae_name: str = "the SAE") -> list[tuple[int, str, str | None]]:
    """Objects of {feature|index, description, explanationModelName?} -> (feature, description, explainer).

    Neuronpedia's export (a JSON list of {modelId, layer, index: "123", description, explanationModelName,
    typeName, ...}) imports as is; with `neuronpedia_id` (the target SAE's, when known) its modelId/layer must
    name that SAE (check_neuronpedia_ids). A row without a feature or a description, or with a feature that is
    not an integer in range, is an error naming the row: a half-imported file would be worse than none.
    """
    records = list(records)
    check_neuronpedia_ids(records, neuronpedia_id, sae_name, where)
    out = []
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            raise InvalidInput(
                f"{where}row {i} is not an object; each row needs a feature (or index) and a description"
            )
        raw_f, desc = _pick(rec, FEATURE_KEYS), _pick(rec, DESCRIPTION_KEYS)
        if raw_f is None or desc is None:
            raise InvalidInput(
                f"{where}row {i} has no {'feature (or index)' if raw_f is None else 'description'}; "
                f"keys found: {', '.join(map(str, rec)) or '(none)'}"
            )
        try:
            feature = int(str(raw_f).strip())
        except ValueError:
            raise InvalidInput(f"{where}row {i}: feature {raw_f!r} is not an integer") from None
        if feature < 0 or (d_sae is not None and feature >= d_sae):
            raise InvalidInput(f"{where}row {i}: feature {feature} is out of range for an SAE with {d_sae} features")
        desc = str(desc).strip()
        if desc:
            explainer = _pick(rec, EXPLAINER_KEYS)
            out.append((feature, desc, str(explainer) if explainer is not None else None))
    return out


def parse_explanations_text(text: str, name: str, d_sae: int | None = None, neuronpedia_id: str | None = None,
                            sae_name: str = "the SAE") -> list[tuple[int, str, str | None]]:
    """A JSON list (or {"explanations": [...]}), JSONL, or CSV with a header row -> normalised rows.
    `neuronpedia_id`, `sae_name`: the target SAE, checked against the rows' modelId/layer (normalise_rows)."""
    where = f"{name}: "
    stripped = text.lstrip()
    suffix = Path(name).suffix.lower()
    if not stripped:
        raise InvalidInput(f"{where}the file is empty")
    if suffix == ".csv" or (suffix not in (".json", ".jsonl") and not stripped.startswith(("[", "{"))):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not (set(reader.fieldnames) & set(FEATURE_KEYS)):
            raise InvalidInput(
                f"{where}a CSV needs a header row with a 'feature' (or 'index') and a 'description' column"
            )
        return normalise_rows(reader, d_sae, where, neuronpedia_id=neuronpedia_id, sae_name=sae_name)
    if suffix == ".jsonl" or (stripped.startswith("{") and "\n{" in stripped and suffix != ".json"):
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{where}line {n} is not valid JSON: {exc.msg}") from None
        return normalise_rows(records, d_sae, where, neuronpedia_id=neuronpedia_id, sae_name=sae_name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{where}not valid JSON (line {exc.lineno}: {exc.msg}); expected a list of objects"
        ) from None
    rows = explanation_list(data)
    if rows is None:
        raise InvalidInput(f"{where}expected a JSON list of {{feature, description}} objects")
    return normalise_rows(rows, d_sae, where, neuronpedia_id=neuronpedia_id, sae_name=sae_name)


def explanation_list(data: object) -> list | None:
    """Parsed JSON -> its list of explanation rows: the list itself, or under "explanations" / "data" in an
    object (Neuronpedia's API wraps its export so); None when there is no list."""
    if isinstance(data, dict):
        data = data.get("explanations", data.get("data"))
    return data if isinstance(data, list) else None


def read_explanations_file(path: Path, d_sae: int | None = None, neuronpedia_id: str | None = None,
                           sae_name: str = "the SAE") -> list[tuple[int, str, str | None]]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist; pass a JSON, JSONL or CSV file of {{feature, description}}")
    return parse_explanations_text(path.read_text(encoding="utf-8"), path.name, d_sae, neuronpedia_id, sae_name)


def fetch_neuronpedia_export(neuronpedia_id: str, timeout_s: float = 60.0) -> list[dict]:
    """Download Neuronpedia's explanation export for `MODEL/SAE` (e.g. gpt2-small/7-res-jb)."""
    import requests

    model_id, sep, sae_id = (neuronpedia_id or "").partition("/")
    if not sep or not model_id or not sae_id:
        raise InvalidInput(f"neuronpedia id {neuronpedia_id!r} is not MODEL/SAE (e.g. gpt2-small/7-res-jb)")
    try:
        resp = requests.get(
            NEURONPEDIA_EXPORT_URL,
            params={"modelId": model_id, "saeId": sae_id},
            headers={"Accept": "application/json"},
            timeout=(10.0, timeout_s),
        )
    except requests.RequestException as exc:
        raise LoadError(
            f"could not reach Neuronpedia ({type(exc).__name__}); this needs network once. Offline, import a file "
            "instead: sae-mcp explanations import --sae ... FILE.json (Neuronpedia's export or {feature, description} "
            "rows)"
        ) from exc
    if resp.status_code != 200:
        raise LoadError(
            f"Neuronpedia answered HTTP {resp.status_code} for {neuronpedia_id}; check the id, or download the export "
            "from its website and import the file"
        )
    try:
        data = resp.json()
    except ValueError:
        raise LoadError(
            f"Neuronpedia's answer for {neuronpedia_id} is not JSON; import a downloaded file instead"
        ) from None
    rows = explanation_list(data)
    if rows is None:
        raise LoadError(f"Neuronpedia's export for {neuronpedia_id} is not a list of explanations")
    return rows
