"""Taxonomy: rules, unmapped reporting, the user mapping file, prompt templates."""

from __future__ import annotations

import json

import pytest

from llcm.data.taxonomy import Taxonomy, load_mapping, render_prompt, slug, words
from llcm.errors import UserError


def test_words_and_slugs():
    assert words("BrainTumor_MRI-dataset (v2)") == ["brain", "tumor", "mri", "dataset", "v2"]
    assert slug("COVID-19 Radiography") == "covid-19-radiography"


@pytest.mark.parametrize("key,label,context,fields,prompt", [
    ("kaggle-cxr/pneumonia", "PNEUMONIA", ["chest_xray"],
     {"body_part": "chest", "modality": "X-ray", "disease": "pneumonia"}, "chest X-ray, pneumonia"),
    ("bt/glioma", "glioma_tumor", ["Brain-Tumor-MRI"],
     {"body_part": "brain", "modality": "MRI", "disease": "glioma"}, "brain MRI, glioma"),
    ("bt/notumor", "notumor", ["brain mri"], {"condition": "normal"}, "brain MRI, normal"),
    ("ham/mel", "mel", ["HAM10000"], {"modality": "dermoscopy", "disease": "melanoma"}, "dermoscopy, melanoma"),
    ("vet/dog-cardiomegaly", "Cardiomegaly", ["dog thorax xray"],
     {"species": "dog", "disease": "cardiomegaly"}, "dog chest X-ray, cardiomegaly"),
])
def test_rules(key, label, context, fields, prompt):
    info = Taxonomy().resolve(key, label, context)
    assert info.mapped, info.unmapped_reason
    for k, v in fields.items():
        assert getattr(info, k) == v
    assert info.prompt == prompt


def test_unknown_words_are_reported_not_guessed():
    tax = Taxonomy()
    info = tax.resolve("lc25000/lung-n", "lung_n", ["lung colon histopathology"])
    assert not info.mapped and info.unmapped_reason == "unknown words: n"
    # the fallback prompt is the folders below the source (not the source name, lc25000) and the label
    assert info.disease == "" and info.prompt == "lung colon histopathology lung n"
    assert tax.resolve("bt/yes", "yes", ["brain tumor"]).unmapped_reason == "no known word in the label"
    assert tax.resolve("x/pneumonia", "pneumonia", ["misc"]).unmapped_reason == "no modality"


def test_user_mapping_extends_vocabulary_and_overrides_classes(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({
        "vocabulary": {"condition": {"normal": ["n"]}},
        "classes": {"lc25000/lung-n": {"name": "lung-histology-normal", "prompt": "lung histology, benign tissue"},
                    "*/excluded-*": {"exclude": True}},
        "prompt_template": "{modality} of the {body_part}[ with {disease}]",
    }))
    tax = Taxonomy(load_mapping(path))
    info = tax.resolve("lc25000/lung-n", "lung_n", ["lung histopathology"])
    assert info.mapped and info.id == "lung-histology-normal" and info.prompt == "lung histology, benign tissue"
    assert info.condition == "normal" and info.body_part == "lung"
    assert tax.resolve("src/excluded-stuff", "excluded stuff", []).excluded
    assert tax.resolve("c/pneumonia", "pneumonia", ["chest xray"]).prompt == "X-ray of the chest with pneumonia"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_mapping(tmp_path / "bad.json")
    (tmp_path / "badfield.json").write_text(json.dumps({"vocabulary": {"colour": {}}}))
    with pytest.raises(UserError, match="unknown vocabulary field"):
        load_mapping(tmp_path / "badfield.json")


def test_render_prompt_groups():
    t = "[{animal} ][{body_part} ]{modality}[, {disease}]"
    assert render_prompt(t, {"modality": "CT", "body_part": "head", "disease": ""}) == "head CT"
    assert render_prompt(t, {"modality": "", "body_part": "head"}) is None
