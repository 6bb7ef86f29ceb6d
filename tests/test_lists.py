"""The concept lists file: what settings may be chosen on, and the sealed list that is only measured."""

import pytest
import yaml

from sculpt.emoji.dataset import EmojiDataset
from sculpt.emoji.lists import LISTS_PATH, draw_sealed, draw_unprotected, load_lists, render_lists_file
from sculpt.emoji.taxonomy import load_taxonomy


def test_the_committed_file_holds_exactly_what_its_rules_draw():
    lists = load_lists()
    assert LISTS_PATH.read_text(encoding="utf-8") == render_lists_file(lists.seed, lists.development)


def test_the_sealed_list_is_disjoint_from_development_one_per_superclass_and_no_weapon():
    tax, lists = load_taxonomy(), load_lists()
    development = {n for names in lists.development.values() for n in names}
    assert len(lists.sealed) == 10 and not development & set(lists.sealed)
    assert len({tax.superclass_of(n) for n in lists.sealed}) == 10
    assert not set(lists.sealed) & set(tax.weapon_names)
    assert all(tax.neighbours_of(n) for n in lists.sealed)  # something to map it onto, a sibling to measure


def test_the_sealed_draw_depends_on_the_seed_and_changes_with_it():
    tax = load_taxonomy()
    dev = [n for names in load_lists().development.values() for n in names]
    assert draw_sealed(tax, dev, 2026) == draw_sealed(tax, dev, 2026)
    assert draw_sealed(tax, dev, 2026) != draw_sealed(tax, dev, 7)


def test_each_unprotected_sibling_is_a_sibling_outside_its_list():
    tax, lists = load_taxonomy(), load_lists()
    for name in lists.names():
        concepts = lists.get(name)
        assert set(lists.unprotected[name]) == set(concepts)
        for concept, sibling in lists.unprotected[name].items():
            assert tax.superclass_of(sibling) == tax.superclass_of(concept)
            assert sibling not in concepts and sibling != concept
    assert draw_unprotected(tax, lists.sealed, lists.seed) == lists.unprotected["sealed"]


def test_an_unknown_list_is_named_in_the_error():
    with pytest.raises(KeyError, match="known: targets, protocol1, heldout, sealed"):
        load_lists().get("test")


def test_the_oracle_stream_holds_no_picture_of_a_left_out_class():
    from sculpt.emoji.train import kept_class_ids

    tax, lists = load_taxonomy(), load_lists()
    kept = kept_class_ids("sealed")
    left_out = {tax[n].id for n in lists.sealed}
    assert len(kept) == len(tax) - 10 and not left_out & set(kept)
    stream = EmojiDataset(seed=3, classes=kept)
    batch = stream.batch(0, 2 * len(kept))
    assert not left_out & set(batch["class_id"].tolist())
    assert sorted(set(batch["class_id"].tolist())) == sorted(kept)  # balanced over what is kept
    assert kept_class_ids(None) is None and kept_class_ids("") is None
