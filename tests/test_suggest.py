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


def _wordnet_folder(tmp_path):
    """A three-synset WordNet in the database's own format: tench -> cyprinid -> fish (byte offsets
    as WordNet lays them out: each data line starts with its own offset)."""
    synsets = [("tench", ["tench", "Tinca_tinca"], "cyprinid"), ("cyprinid", ["cyprinid", "cyprinid_fish"], "fish"),
               ("fish", ["fish"], None)]
    header = "  1 This file is a tiny stand-in for WordNet 3.0's data.noun\n"
    offsets, at = {}, len(header.encode())
    for key, words, up in synsets:  # offsets are 8 digits wide: a line's length does not depend on them
        offsets[key] = at
        at += len(_data_line(0, words, None if up is None else 0).encode())
    lines = [_data_line(offsets[k], w, offsets[h] if h else None) for k, w, h in synsets]
    (tmp_path / "data.noun").write_text(header + "".join(lines))
    index = "".join(f"{w.lower()} n 1 1 @ 1 0 {offsets[k]:08d}  \n" for k, words, _ in synsets for w in words)
    (tmp_path / "index.noun").write_text("  1 licence\n" + index)
    return tmp_path


def _data_line(offset, words, hypernym) -> str:
    pointers = f"001 @ {hypernym:08d} n 0000" if hypernym is not None else "000"
    return f"{offset:08d} 05 n {len(words):02x} " + " ".join(f"{w} 0" for w in words) + f" {pointers} | a gloss\n"


def test_a_real_model_gets_its_superclass_from_wordnet_hypernyms_ranked_by_its_text_encoder(tmp_path):
    from sculpt.data.neighbours import similarities
    from sculpt.data.wordnet import WordNet
    from sculpt.models.tiny import tiny_pipeline

    wn = WordNet(_wordnet_folder(tmp_path))
    assert wn.hypernyms("tench") == ["cyprinid", "cyprinid fish", "fish"]  # nearest level first
    assert wn.hypernyms("Tinca tinca", depth=1) == ["cyprinid", "cyprinid fish"] and wn.hypernyms("unicorn") == []
    pipe = tiny_pipeline(seed=0)
    s = suggest("tench", pipe, ["dog", "car"], taxonomy=None, wordnet=wn)
    best = similarities(pipe, "tench", ["cyprinid", "cyprinid fish", "fish"])[0][0]
    assert s.superclass == best and "WordNet hypernym" in s.superclass_reason
    none = suggest("unicorn", pipe, ["dog", "car"], taxonomy=None, wordnet=wn)
    assert none.superclass is None and "WordNet has no noun 'unicorn'" in none.superclass_reason
    assert suggest("tench", pipe, ["dog"], taxonomy=None, wordnet=None).superclass is None
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        WordNet(tmp_path / "nowhere")


def test_run_neighbours_keeps_the_nearest_and_optionally_the_siblings_never_what_is_erased(emoji):
    """The neighbours a run keeps: the k nearest in the model's text space, never a concept of the run
    nor the superclass; with siblings on (emoji taxonomy), the concept's siblings come first."""
    from sculpt.config import Concept
    from sculpt.data.neighbours import default_siblings, default_vocabulary, run_neighbours

    pipe, tax = emoji
    saw, lorry = (Concept(name=n, superclass=tax[n].superclass) for n in ("carpentry saw", "articulated lorry"))
    vocab = default_vocabulary("emoji")
    plain = run_neighbours(pipe, [saw, lorry], [saw, lorry], 4, vocab, "a photo of a {}")
    assert [len(v) for v in plain.values()] == [4, 4]
    with_sib = run_neighbours(pipe, [saw, lorry], [saw, lorry], 4, vocab, "a photo of a {}", default_siblings("emoji"))
    words = {n: [w for w, _ in v] for n, v in with_sib.items()}
    siblings = ["hammer", "wrench", "screwdriver", "pick"]
    near = [w for w, _ in plain["carpentry saw"]]
    assert words["carpentry saw"] == [w for w in siblings if w not in near] + near  # siblings first, each once
    for n, ws in words.items():
        assert not {"carpentry saw", "articulated lorry", tax[n].superclass} & set(ws) and len(ws) == len(set(ws))
    with pytest.raises(ValueError, match="both kept and erased"):
        run_neighbours(pipe, [Concept(name="bus", superclass="vehicle", neighbours=["articulated lorry"])], [lorry],
                       4, vocab, "a photo of a {}")


def test_the_pooled_rule_ranks_by_meaning_not_by_prompt_length(emoji):
    """Flattened padded states (the default: what cross-attention reads) make prompts of the same token
    count look alike (church -> house, dog, pizza, fish); the pooled states of the real tokens put the
    other buildings first, and do not depend on how many padding positions the encoder has."""
    from sculpt.data.neighbours import prompt_vectors, similarities

    pipe, tax = emoji
    words = [c.name for c in tax.classes if c.name != "church"]
    buildings = {c.name for c in tax.members_of("building")} - {"church"}
    assert {w for w, _ in similarities(pipe, "church", words, how="pooled")[:4]} == buildings
    assert {w for w, _ in similarities(pipe, "church", words)[:4]} != buildings
    v = prompt_vectors(pipe, ["a photo of a church", "a photo of a dog"], how="pooled")
    assert v.shape == (2, pipe.text_encoder.config.hidden_size)


def _wordnet_church(tmp_path):
    """church (church building) with its hyponyms cathedral and chapel, and an unrelated house."""
    entries = [("church", ["church", "church_building"], ["cathedral", "chapel"]), ("cathedral", ["cathedral"], []),
               ("chapel", ["chapel"], []), ("house", ["house"], [])]
    header = "  1 a tiny stand-in for WordNet 3.0's data.noun\n"
    width = {k: len(_hypo_line(0, w, [0] * len(h)).encode()) for k, w, h in entries}
    offsets, at = {}, len(header.encode())
    for k, _, _ in entries:
        offsets[k] = at
        at += width[k]
    lines = [_hypo_line(offsets[k], w, [offsets[x] for x in h]) for k, w, h in entries]
    (tmp_path / "data.noun").write_text(header + "".join(lines))
    index = "".join(f"{w.lower()} n 1 1 ~ 1 0 {offsets[k]:08d}  \n" for k, words, _ in entries for w in words)
    (tmp_path / "index.noun").write_text("  1 licence\n" + index)
    return tmp_path


def _hypo_line(offset, words, hyponyms) -> str:
    pointers = f"{len(hyponyms):03d}" + "".join(f" ~ {h:08d} n 0000" for h in hyponyms)
    return f"{offset:08d} 06 n {len(words):02x} " + " ".join(f"{w} 0" for w in words) + f" {pointers} | a gloss\n"


def test_a_synonym_or_a_kind_of_the_concept_is_never_its_neighbour(tmp_path, emoji):
    """WordNet's lemma synonyms and hyponyms of the concept are the concept: keeping "cathedral" would
    keep a way to draw "church". The held-out classes of a run are never neighbours either."""
    from sculpt.config import Concept
    from sculpt.data.neighbours import run_neighbours
    from sculpt.data.wordnet import WordNet

    pipe, _ = emoji
    wn = WordNet(_wordnet_church(tmp_path))
    assert wn.same_or_below("church") == {"church", "church building", "cathedral", "chapel"}
    church = Concept(name="church", superclass="building")
    vocab = ["cathedral", "church building", "chapel", "house", "castle", "dog"]
    without = run_neighbours(pipe, [church], [church], 6, vocab, "a photo of a {}")
    assert {"cathedral", "chapel", "church building"} <= {w for w, _ in without["church"]}
    kept = run_neighbours(pipe, [church], [church], 6, vocab, "a photo of a {}", wordnet=wn, held_out=["castle"])
    assert [w for w, _ in kept["church"]] and {w for w, _ in kept["church"]} <= {"house", "dog"}
