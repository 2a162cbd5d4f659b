"""Class names -> a taxonomy (species, body part, disease, condition, modality) and a prompt.

A class *key* is built from where the images were found: the source name, the folders above the
label (minus split and container folders) and the label itself, each slugged, joined by "/"
(e.g. `chest-xray/pneumonia`). The key is then resolved by:

1. an explicit entry in the mapping file's "classes" (exact key first, then globs in file order):
   it may set any field, a display `name` (two keys with one name are merged), a `prompt`, or
   `"exclude": true`;
2. otherwise by rules: the label's words are matched (longest phrase first) against the
   vocabulary; the context's words fill the fields the label left empty.

A label word that is neither in the vocabulary, an ignore-word nor a number makes the class
*unmapped*; so does a missing modality. Unmapped classes are kept (or dropped with
`require_mapped`) and listed in the card; fields are never guessed from unknown words.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from llcm.errors import UserError

FIELDS = ("species", "body_part", "disease", "condition", "modality")
DEFAULT_MAPPING_PATH = Path(__file__).with_name("taxonomy_default.json")


def words(text: str) -> list[str]:
    """Normalised words: camelCase split, lower case, every non-alphanumeric run a separator."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(text))
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", text)
    return [w for w in re.split(r"[^0-9a-z]+", text.lower()) if w]


def slug(text: str) -> str:
    return "-".join(words(text))


def class_dir_name(class_id: str) -> str:
    """The folder name of a class id inside train/ and test/ (ids contain '/')."""
    return "__".join(part for part in class_id.split("/") if part) or "unnamed"


@dataclass(frozen=True)
class ClassInfo:
    """The resolved class of a key; `id` is what the dataset calls it (key, or mapped name)."""

    id: str
    key: str
    species: str = ""
    body_part: str = ""
    disease: str = ""
    condition: str = ""
    modality: str = ""
    prompt: str = ""
    mapped: bool = True
    unmapped_reason: str = ""
    excluded: bool = False
    explicit: bool = False

    def fields(self) -> dict:
        return {f: getattr(self, f) for f in FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)


def load_mapping(path: str | Path | None = None) -> dict:
    """The default mapping, extended by the user's JSON file (vocabulary merged, classes appended)."""
    base = json.loads(DEFAULT_MAPPING_PATH.read_text(encoding="utf-8"))
    if path is None:
        return base
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"mapping file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"mapping file {path} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise UserError(f"mapping file {path} must hold a JSON object")
    merged = copy.deepcopy(base)
    for field_name, values in (user.get("vocabulary") or {}).items():
        if field_name not in FIELDS:
            raise UserError(f"mapping file {path}: unknown vocabulary field {field_name!r} (use {', '.join(FIELDS)})")
        target = merged["vocabulary"].setdefault(field_name, {})
        for canonical, synonyms in values.items():
            target.setdefault(canonical, [])
            target[canonical] = list(target[canonical]) + [s for s in synonyms if s not in target[canonical]]
    merged["ignore_words"] = list(merged.get("ignore_words", [])) + list(user.get("ignore_words", []))
    merged["classes"] = dict(user.get("classes") or {})
    for k in ("prompt_template", "default_species"):
        if k in user:
            merged[k] = user[k]
    return merged


_GROUP_RE = re.compile(r"\[([^\[\]]*)\]")
_FIELD_RE = re.compile(r"\{(\w+)\}")


def render_prompt(template: str, values: dict) -> str | None:
    """Fill `{field}`s; a `[...]` group is dropped when any field in it is empty.

    Returns None when a field outside every group is empty (the caller falls back)."""

    def fill(text: str) -> str | None:
        missing = [n for n in _FIELD_RE.findall(text) if not values.get(n)]
        if missing:
            return None
        return _FIELD_RE.sub(lambda m: str(values[m.group(1)]), text)

    out = _GROUP_RE.sub(lambda m: fill(m.group(1)) or "", template)
    result = fill(out)
    if result is None:
        return None
    return re.sub(r"\s+", " ", result).strip(" ,;")


class Taxonomy:
    """Resolves class keys with a mapping (see `load_mapping`)."""

    def __init__(self, mapping: dict | None = None, prompt_template: str | None = None) -> None:
        self.mapping = mapping if mapping is not None else load_mapping()
        self.template = prompt_template or self.mapping.get("prompt_template") or "{name}"
        self.default_species = self.mapping.get("default_species", "human")
        self.ignore = {w for item in self.mapping.get("ignore_words", []) for w in words(item)}
        self.phrases: dict[tuple[str, ...], tuple[str, str]] = {}
        for field_name in FIELDS:
            for canonical, synonyms in (self.mapping.get("vocabulary", {}).get(field_name) or {}).items():
                for name in [canonical, *synonyms]:
                    toks = tuple(words(name))
                    if toks:
                        self.phrases.setdefault(toks, (field_name, canonical))
        self.max_phrase = max((len(p) for p in self.phrases), default=1)
        self.classes = self.mapping.get("classes") or {}

    def match(self, tokens: list[str]) -> tuple[dict[str, list[str]], list[str]]:
        """Greedy longest-phrase match: ({field: [canonical values]}, [unknown words])."""
        found: dict[str, list[str]] = {}
        unknown: list[str] = []
        i = 0
        while i < len(tokens):
            for n in range(min(self.max_phrase, len(tokens) - i), 0, -1):
                hit = self.phrases.get(tuple(tokens[i : i + n]))
                if hit:
                    field_name, value = hit
                    if value not in found.setdefault(field_name, []):
                        found[field_name].append(value)
                    i += n
                    break
            else:
                tok = tokens[i]
                if tok not in self.ignore and not tok.isdigit():
                    unknown.append(tok)
                i += 1
        return found, unknown

    def _explicit(self, key: str) -> dict | None:
        if key in self.classes:
            return self.classes[key]
        for pattern, entry in self.classes.items():
            if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(key, pattern):
                return entry
        return None

    def resolve(self, key: str, label: str, context: list[str] = ()) -> ClassInfo:
        entry = self._explicit(key)
        label_fields, unknown = self.match(words(label))
        ctx_fields, _ = self.match([w for c in context for w in words(c)])
        values = {}
        for f in FIELDS:
            vals = label_fields.get(f) or ctx_fields.get(f) or []
            values[f] = " and ".join(vals)
        explicit = entry is not None
        if explicit:
            for f in FIELDS:
                if f in entry:
                    values[f] = str(entry[f] or "")
        if not values["species"]:
            values["species"] = self.default_species
        class_id = str(entry.get("name")) if explicit and entry.get("name") else key
        if explicit:
            mapped, reason = True, ""
        elif unknown:
            mapped, reason = False, "unknown words: " + ", ".join(dict.fromkeys(unknown))
        elif not label_fields:
            mapped, reason = False, "no known word in the label"
        elif not values["modality"]:
            mapped, reason = False, "no modality"
        else:
            mapped, reason = True, ""
        # the key starts with the source's name (often a folder's name such as `train` or `src`): a
        # fallback prompt reads only the folders below the source root, or the name the mapping gave
        named = explicit and entry.get("name")
        readable = " ".join(words(class_id.replace("/", " ") if named else " ".join((*context, label))))
        render_values = dict(values, name=readable, label=" ".join(words(label)),
                             animal="" if values["species"] == "human" else values["species"])
        prompt = str(entry["prompt"]) if explicit and entry.get("prompt") else None
        if prompt is None and mapped:
            prompt = render_prompt(self.template, render_values)
        if not prompt:
            prompt = readable
        return ClassInfo(id=class_id, key=key, prompt=prompt, mapped=mapped, unmapped_reason=reason,
                         excluded=bool(explicit and entry.get("exclude")), explicit=explicit, **values)
