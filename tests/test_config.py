"""Config loading: typed overrides, and typos that name the closest valid key."""
import pytest

from core.config import (ConfigError, DataError, apply_overrides, check_choice, load_config,
                         parse_arg)

GPT = "experiments/configs/lm/gpt.py"


def test_overrides_are_typed_and_applied():
    config = load_config(f"{GPT}:size=tiny", ["--config.train.steps=7",
                                             "--config.optim.learning_rate=1e-2",
                                             "--config.model.scan_layers=false",
                                             "--config.data.corpus=austen"])
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optim.learning_rate == 0.01
    assert config.model.scan_layers is False
    assert config.data.corpus == "austen"


def test_mistyped_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"'train\.stesp'.*'train\.steps'"):
        load_config(f"{GPT}:size=tiny", ["--config.train.stesp=7"])


def test_mistyped_config_argument_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"'szie'.*'size'"):
        load_config(f"{GPT}:szie=tiny")


def test_mistyped_choice_lists_the_valid_ones_and_the_closest():
    with pytest.raises(ConfigError, match=r"size 'smal' is not one of \[.*'small'.*\]; "
                                          r"did you mean 'small'\?"):
        load_config(f"{GPT}:size=smal")
    # a sequence keeps its order (the default first), a hint comes before the closest match
    with pytest.raises(DataError, match=r"^split 'tset' is not one of \['train', 'test'\] "
                                        r"\(a hint\); did you mean 'test'\?$"):
        check_choice("split", "tset", ("train", "test"), DataError, hint=" (a hint)")
    check_choice("split", "test", ("train", "test"))  # a valid choice passes


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(f"{GPT}:size=tiny", ["--config.train.steps=many"])


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("experiments/configs/lm/nope.py")


def test_locked_config_rejects_new_attributes():
    config = load_config(f"{GPT}:size=tiny")
    with pytest.raises(AttributeError):
        config.train.stesp = 3


def test_parse_arg_and_apply_overrides_on_plain_dicts():
    args = parse_arg("size=demo,layers=3", size="tiny", layers=2)
    assert (args.size, args.layers) == ("demo", 3)
    config = parse_arg("", a=1)
    with pytest.raises(ConfigError, match="'b'.*'a'"):
        apply_overrides(config, ["b=2"])


def test_rope_swiglu_style_is_gpt2_with_rotary_and_swiglu_at_its_parameter_count():
    gpt2 = load_config(f"{GPT}:size=demo").model
    best = load_config(f"{GPT}:size=demo,style=rope_swiglu").model
    assert {k for k in gpt2 if gpt2[k] != best[k]} == {"pos_emb", "mlp", "d_ff"}
    assert (best.pos_emb, best.mlp) == ("rope", "swiglu")
    # three SwiGLU matrices against GELU's two, so the MLP's parameters agree within 1%
    gelu_ff = 4 * gpt2.d_model  # d_ff None: GELU's default
    assert abs(3 * best.d_ff - 2 * gelu_ff) / (2 * gelu_ff) < 0.01 and best.d_ff % 8 == 0
    with pytest.raises(ConfigError, match=r"style 'rope_swigul' .*did you mean 'rope_swiglu'"):
        load_config(f"{GPT}:size=demo,style=rope_swigul")
