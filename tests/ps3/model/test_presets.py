"""Presets: registry, budgets, overrides by field name, validation."""

from __future__ import annotations

import pytest

from ps3.model import PresetError, UnknownPresetError, get_preset, list_presets
from ps3.model.presets import scale_budgets


def test_registry_lists_released_and_tiny_presets():
    names = list_presets()
    assert {"ps3-1.5k-siglip", "ps3-4k-siglip", "ps3-tiny", "ps3-tiny-4s"} <= set(names)


@pytest.mark.parametrize("name, budgets, grids", [
    ("ps3-1.5k-siglip", (512, 2048), (27, 54, 108)),
    ("ps3-4k-siglip", (85, 341, 2134), (27, 54, 108, 270)),
    ("ps3-tiny", (16, 64), (8, 16, 32)),
])
def test_budgets_match_released_rule(name, budgets, grids):
    p = get_preset(name)
    assert p.budgets == budgets and sum(p.budgets) == p.max_select_num
    assert p.grids == grids


def test_so400m_trunk_numbers():
    p = get_preset("ps3-4k-siglip")
    assert (p.patch_size, p.width, p.depth, p.heads, p.mlp_dim) == (14, 1152, 27, 16, 4304)
    assert p.select_layers == (0, 9, 18, 26) and p.selection_view_size == 1512
    assert (p.text_context_length, p.text_vocab_size, p.text_width, p.text_depth) == (64, 32000, 1152, 27)


def test_override_by_field_name_and_lists_become_tuples():
    p = get_preset("ps3-tiny", depth=2, select_layers=[0, 1], max_select_num=40)
    assert p.depth == 2 and p.select_layers == (0, 1) and p.budgets == (8, 32)
    assert get_preset("ps3-tiny").depth == 4  # the registry entry is untouched


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UnknownPresetError, match=r"Did you mean 'ps3-tiny'.*Valid presets: .*ps3-4k-siglip"):
        get_preset("ps3-tiyn")


def test_unknown_field_suggests_close_name():
    with pytest.raises(UnknownPresetError, match="Did you mean depth"):
        get_preset("ps3-tiny", detph=2)


@pytest.mark.parametrize("overrides, msg", [
    (dict(select_layers=(0, 9)), "select_layers"),
    (dict(scales=(64, 130)), "multiples of patch_size"),
    (dict(scales=(128, 64)), "strictly increasing"),
    (dict(heads=5), "divide by heads"),
    (dict(embed_dim=32), "embed_dim"),
    (dict(max_select_num=10**6), "max_select_num"),
])
def test_bad_overrides_fail_early(overrides, msg):
    with pytest.raises(PresetError, match=msg):
        get_preset("ps3-tiny", **overrides)


def test_scale_budgets_remainder_goes_to_last_scale():
    assert scale_budgets((1, 10, 20), 7) == (1, 6)
    assert sum(scale_budgets((378, 756, 1512, 3780), 1000)) == 1000


def test_to_dict_is_plain():
    d = get_preset("ps3-tiny").to_dict()
    assert d["scales"] == [64, 128, 256] and d["name"] == "ps3-tiny"
