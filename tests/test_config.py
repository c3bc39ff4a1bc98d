"""Configs: presets are data, overrides are type-checked, the smoke switch caps compute only."""

import pytest

from minidalle.presets import PRESETS, SMOKE_CAPS
from minidalle.config import Config, get_config, parse_overrides, smoke_mode
from minidalle.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = get_config(name, smoke=False)
    assert cfg.preset == name
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_ladder_grows():
    sizes = [get_config(p, smoke=False).data.image_size for p in ("smoke", "toy", "small", "paper")]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[1] == 32 and sizes[-1] == 256


def test_smoke_caps_compute_but_not_architecture():
    full, smoke = get_config("paper", smoke=False), get_config("paper", smoke=True)
    for key, cap in SMOKE_CAPS.items():
        sec, name = key.split(".")
        assert getattr(getattr(smoke, sec), name) == min(cap, getattr(getattr(full, sec), name))
    assert smoke.data.image_size == full.data.image_size == 256


def test_smoke_switch_reads_environment(monkeypatch):
    monkeypatch.setenv("MINIDALLE_SMOKE", "1")
    assert smoke_mode() and get_config("toy").train.max_steps == SMOKE_CAPS["train.max_steps"]
    monkeypatch.setenv("MINIDALLE_SMOKE", "0")
    assert not smoke_mode() and get_config("toy").train.max_steps > SMOKE_CAPS["train.max_steps"]


def test_overrides_from_command_line_strings():
    cfg = get_config("toy", parse_overrides(["--train.lr=1e-3", "--code_dim=128", "--data.dataset=folder"]))
    assert cfg.train.lr == 1e-3 and cfg.dvae.code_dim == 128 and cfg.data.dataset == "folder"


@pytest.mark.parametrize("overrides, words", [
    ({"train.lrr": "1"}, "unknown config key 'train.lrr'"),
    ({"nope": "1"}, "unknown config key 'nope'"),
    ({"modle.lr": "1"}, "unknown config section 'modle'"),
    ({"model.lr": "1"}, "unknown config key 'model.lr'; model has: n_layer"),
    ({"train.lr": "fast"}, "expects float"),
    ({"train.batch_size": "2.5"}, "expects int"),
    ({"train.batch_size": True}, "expects int"),
    ({"seed": "1"}, "ambiguous"),
    ({"batch_size": "8"}, "ambiguous"),  # train and dvae_train both have it
    ({"vocab_size": "128"}, "ambiguous"),  # dvae (image codes) and text (BPE) both have it
])
def test_bad_overrides_name_the_problem(overrides, words):
    with pytest.raises(ConfigError, match=words):
        get_config("toy", overrides)


def test_unknown_preset_and_malformed_flag():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(ConfigError, match="--key=value"):
        parse_overrides(["--train.lr", "3"])


def test_the_transformer_section_per_preset():
    paper = get_config("paper", smoke=False)  # the smoke switch caps warmup_steps
    assert (paper.model.n_layer, paper.model.n_head, paper.model.head_dim, paper.model.conv_kernel) == (64, 62, 64, 11)
    assert (paper.text.text_len, paper.text.vocab_size, paper.dvae.vocab_size) == (256, 16_384, 8192)
    assert (paper.train.beta1, paper.train.beta2, paper.train.weight_decay, paper.train.grad_clip) == (0.9, 0.96, 4.5e-2, 4.0)
    assert paper.train.lr == 4.5e-4 and paper.train.warmup_steps == 5_000 and paper.train.ema_decay == 0.99
    for preset in PRESETS:  # every preset's stage 2 trains with the paper's AdamW betas
        assert get_config(preset).train.beta2 == 0.96
    assert get_config("smoke").model.n_layer == 3  # one layer of each kind: row, column, conv
