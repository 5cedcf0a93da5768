"""HybridConfig validation and the byte tokenizer."""

from __future__ import annotations

import pytest

from model import ByteTokenizer, HybridConfig, render_turn
from model.exceptions import ConfigError
from model.tokenizer import ASSISTANT, EOT, USER, VOCAB_SIZE


def test_pattern_tiles_over_layers():
    cfg = HybridConfig(n_layers=6, pattern="GGA")
    assert cfg.layer_kinds == "GGAGGA"
    assert cfg.gdn_layers == [0, 1, 3, 4] and cfg.attn_layers == [2, 5]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("pattern", "GXA", "pattern"),
        ("pattern", "GAG", "n_layers=4"),
        ("d_model", 0, "d_model"),
        ("window", -3, "window"),
        ("head_dim", 512, "head_dim"),
        ("conv_size", 1, "conv_size"),
        ("vocab_size", 10, "vocab_size"),
    ],
)
def test_bad_field_is_named(field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        HybridConfig(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_config_hash_is_stable_and_ignores_passes():
    a = HybridConfig()
    assert a.config_hash() == HybridConfig().config_hash()
    assert a.config_hash() == HybridConfig(sleep_passes=8).config_hash()
    assert a.config_hash() != HybridConfig(window=128).config_hash()
    assert HybridConfig.from_dict(a.to_dict()) == a
    assert HybridConfig(rope_base=10000).config_hash() == a.config_hash()
    assert a.d_ff % 64 == 0 and a.d_ff >= 8 * a.d_model // 3


def test_render_turn_and_round_trip():
    tok = ByteTokenizer()
    ids = render_turn("user", "alice reports to bob. é")
    assert ids[0] == USER and ids[-1] == EOT
    assert tok.decode(ids) == "alice reports to bob. é"
    assert tok.decode([ASSISTANT, *tok.encode("hi"), EOT], show_specials=True) == (
        "<assistant>hi<eot>"
    )
    assert max(ids) < VOCAB_SIZE
    with pytest.raises(ValueError, match="role"):
        render_turn("robot", "x")
