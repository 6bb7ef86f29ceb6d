"""`sculpt suggest` on the committed emoji model: the superclass and synonyms a spec needs, and the
neighbours an erasure may hurt, ranked by the model's own text-encoder states."""

import pytest
import torch

from sculpt.data.prepare import encode_prompts
from sculpt.emoji.taxonomy import load_taxonomy
from sculpt.models.loading import load_pipeline
from sculpt.suggest import suggest


@pytest.fixture(scope="module")
def emoji():
    return load_pipeline("emoji"), load_taxonomy()


def test_a_known_class_gets_its_superclass_synonyms_and_its_nearest_prompts(emoji):
    pipe, tax = emoji
    s = suggest("tropical fish", pipe, taxonomy=tax, top=5)
    assert s.superclass == "fish" and s.synonyms == list(tax["tropical fish"].synonyms)
    words = [w for w, _ in s.neighbours]
    assert "tropical fish" not in words and not set(s.synonyms) & set(words)
    sims = [v for _, v in s.neighbours]
    assert sims == sorted(sims, reverse=True) and words[0] == "fish"  # its sibling class tops the list
    e = encode_prompts(pipe, ["a photo of a tropical fish", "a photo of a fish"]).flatten(1)
    assert sims[0] == pytest.approx(torch.nn.functional.cosine_similarity(e[:1], e[1:]).item(), abs=1e-6)
    assert "superclass: fish" in s.spec_yaml()


def test_a_family_lists_its_members_and_a_safe_anchor_and_ranks_only_outsiders(emoji):
    pipe, tax = emoji
    s = suggest("weapon", pipe, taxonomy=tax, top=6)
    assert s.members == list(tax.weapon_names) and s.superclass == "tool"
    assert not set(s.members) & {w for w, _ in s.neighbours}
    import yaml

    assert yaml.safe_load(s.spec_yaml())["concepts"][0]["members"] == list(tax.weapon_names)


def test_an_unknown_concept_borrows_the_nearest_class_superclass_and_bad_input_is_named(emoji):
    pipe, tax = emoji
    s = suggest("unicorn", pipe, taxonomy=tax, top=3)
    nearest = s.neighbours[0][0]
    assert s.superclass == tax[nearest].superclass and nearest in s.superclass_reason
    with pytest.raises(ValueError, match="top must be positive"):
        suggest("unicorn", pipe, taxonomy=tax, top=0)
    with pytest.raises(ValueError, match="no vocabulary"):
        suggest("unicorn", pipe, taxonomy=None)


def test_the_written_spec_loads_and_the_anchor_check_measures_the_rule(emoji, tmp_path):
    """`suggest` writes a whole spec that `sculpt erase` accepts, naming the neighbours the paper's
    method keeps (nearest first, never the concept or its superclass); its anchor check draws the
    superclass with and without the concept as negative prompt and applies the data's rule: "dog"
    minus "poodle" draws no dog, so the poodle's anchors come from the pictures drawn without it."""
    from sculpt.config import DataConfig, load_spec
    from sculpt.data.anchors import default_judge
    from sculpt.emoji.demo import EMOJI_DATA
    from sculpt.methods.sculpting import NB_COUNT
    from sculpt.suggest import check_anchor

    pipe, tax = emoji
    s = suggest("poodle", pipe, taxonomy=tax, top=8)
    assert len(s.keep) == NB_COUNT and "guide dog" in s.keep and not {"poodle", "dog"} & set(s.keep)
    ranked = [w for w, _ in s.neighbours if w != "dog"]
    assert s.keep == ranked[:NB_COUNT]
    anchor = check_anchor(pipe, s, default_judge("emoji"), DataConfig(**EMOJI_DATA), n=8)
    assert anchor["with_negative"]["superclass"] < 0.5 < anchor["without_negative"]["superclass"]
    assert anchor["kept"] == round(8 * anchor["without_negative"]["superclass"]) and "from both" in anchor["how"]
    path = tmp_path / "spec.yaml"
    path.write_text(s.spec_yaml("emoji"))
    cfg = load_spec(path)
    assert cfg.concepts[0].name == "poodle" and cfg.concepts[0].superclass == "dog"
    assert cfg.concepts[0].neighbours == s.keep and cfg.concepts[0].negative_prompt is None
