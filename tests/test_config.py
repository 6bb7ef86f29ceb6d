"""A spec error names the file, the line and the field, before any work starts."""

import pytest

from sculpt.config import SpecError, load_spec, parse_spec

GOOD = """\
model: emoji
mode: sequential
method:
  name: sculpting
  lr: 1.0e-4
concepts:
  - name: tropical fish
    superclass: fish
  - name: poodle
    superclass: dog
    synonyms: [toy dog]
"""


def test_good_spec_has_published_defaults():
    cfg = parse_spec(GOOD)
    m = cfg.method_config()
    assert m.lr == 1e-4
    # everything not set keeps the paper's published value
    assert (m.mask_ratio, m.mask_update_every, m.drop_ratio, m.lambda_align, m.lambda_kd) == (0.5, 100, 0.2, 0.25, 0.25)
    assert (m.epochs, m.steps_per_epoch, m.warmup_steps, m.batch_size) == (10, 50, 50, 2)
    assert [s[0].name for s in cfg.stages()] == ["tropical fish", "poodle"]
    assert cfg.concepts[1].concept_prompts("a photo of a {}") == ["a photo of a poodle", "a photo of a toy dog"]


def _error(text):
    with pytest.raises(SpecError) as exc:
        parse_spec(text, "spec.yaml")
    return str(exc.value)


def test_unknown_key_named_with_line():
    msg = _error(GOOD.replace("    superclass: dog", "    superclass: dog\n    colour: red"))
    assert "spec.yaml:11" in msg and "concepts.1.colour" in msg and "unknown field" in msg


def test_unknown_method_setting_named():
    msg = _error(GOOD.replace("  lr: 1.0e-4", "  learning_rate: 1.0e-4"))
    assert "spec.yaml:5" in msg and "method.learning_rate" in msg and "unknown field" in msg


def test_empty_concept():
    msg = _error(GOOD.replace("name: poodle", "name: ''"))
    assert "concepts.1.name" in msg and "empty" in msg


def test_concept_equal_to_superclass():
    msg = _error(GOOD.replace("superclass: dog", "superclass: Poodle"))
    assert "own superclass" in msg and "spec.yaml:9" in msg


def test_duplicate_concept():
    msg = _error(GOOD.replace("name: poodle", "name: Tropical Fish"))
    assert "listed twice" in msg


def test_name_that_would_escape_output_folder():
    msg = _error(GOOD.replace("name: poodle", "name: ../../etc"))
    assert "safe file name" in msg


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_not_yaml():
    assert "not valid YAML" in _error("concepts: [a, b\n")


FAMILY = """\
model: emoji
concepts:
  - name: weapon
    superclass: tool
    synonyms: [gun, dagger]
    members: [dagger, axe]
"""


def test_a_family_names_its_members_and_trains_on_every_word_once():
    c = parse_spec(FAMILY).concepts[0]
    assert c.members == ["dagger", "axe"] and c.words == ["weapon", "gun", "dagger", "axe"]
    assert c.concept_prompts("a photo of a {}") == ["a photo of a weapon", "a photo of a gun", "a photo of a dagger",
                                                    "a photo of an axe"]
    msg = _error(FAMILY.replace("[dagger, axe]", "[dagger, '']"))
    assert "spec.yaml:6" in msg and "members" in msg and "empty" in msg
