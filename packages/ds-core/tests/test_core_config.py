"""The strict config base: each kind of bad input gives the stated message."""
import json
import warnings

import pytest
from ds_core.config import AUTO, Auto, ConfigError, DeprecatedConfigWarning, DSConfigModel, parse_config
from pydantic import Field


class Offload(DSConfigModel):
    device: str = Field("none", description="where the optimizer state lives")


class Zero(DSConfigModel):
    _deprecated_keys = {"cpu_offload": ("offload_optimizer", lambda on: {"device": "cpu" if on else "none"})}
    _unsupported_keys = {"offload_param": "needs ZeRO stage 3 (ds-train issue 5)"}

    stage: int = Field(0, ge=0, le=3, description="ZeRO stage")
    reduce_bucket_size: int | Auto = Field(500_000_000, description="elements per reduce bucket")
    offload_optimizer: Offload | None = None


class Root(DSConfigModel):
    train_batch_size: int | Auto | None = None
    zero_optimization: Zero = Field(default_factory=Zero)


def test_unknown_key_names_key_path_and_closest_valid_key():
    with pytest.raises(ConfigError) as err:
        parse_config(Root, {"zero_optimization": {"stag": 2}})
    msg = str(err.value)
    assert "zero_optimization.stag" in msg and "did you mean 'stage'" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"train_batch_sizes.*did you mean 'train_batch_size'"):
        parse_config(Root, {"train_batch_sizes": 8})


def test_wrong_type_names_path_and_value():
    with pytest.raises(ConfigError) as err:
        parse_config(Root, {"zero_optimization": {"stage": "two"}})
    assert "zero_optimization.stage" in str(err.value) and "'two'" in str(err.value)


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        parse_config(Root, {"zero_optimization": {"stage": 7}})


def test_deprecated_alias_is_renamed_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = parse_config(Root, {"zero_optimization": {"cpu_offload": True}})
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert any(issubclass(w.category, DeprecatedConfigWarning) and "cpu_offload" in str(w.message) for w in caught)


def test_deprecated_and_new_name_together_is_an_error():
    with pytest.raises(ConfigError, match="deprecated name for 'offload_optimizer'"):
        parse_config(Root, {"zero_optimization": {"cpu_offload": True, "offload_optimizer": {"device": "cpu"}}})


def test_unsupported_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="'offload_param' is not supported yet: needs ZeRO stage 3"):
        parse_config(Root, {"zero_optimization": {"offload_param": {"device": "cpu"}}})


def test_file_not_found(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.json"):
        parse_config(Root, str(tmp_path / "missing.json"))


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n}')
    with pytest.raises(ConfigError, match=r"invalid JSON in .*bad.json: .* line 3 column 1"):
        parse_config(Root, str(path))


def test_non_object_json_is_rejected(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_config(Root, path)


def test_reads_file_dict_string_and_env_var(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16}))
    assert parse_config(Root, str(path)).train_batch_size == 16
    assert parse_config(Root, {"train_batch_size": 4}).train_batch_size == 4
    assert parse_config(Root, '{"train_batch_size": 2}').train_batch_size == 2
    monkeypatch.setenv("DS_CONFIG", str(path))
    assert parse_config(Root, None).train_batch_size == 16
    monkeypatch.delenv("DS_CONFIG")
    with pytest.raises(ConfigError, match=r"\$DS_CONFIG is not set"):
        parse_config(Root, None)


def test_auto_values_are_listed_resolved_or_rejected():
    cfg = parse_config(Root, {"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": "auto"}})
    assert cfg.auto_fields() == ["train_batch_size", "zero_optimization.reduce_bucket_size"]
    cfg.zero_optimization.resolve_auto("reduce_bucket_size", 1234)
    assert cfg.zero_optimization.reduce_bucket_size == 1234
    cfg.zero_optimization.resolve_auto("reduce_bucket_size", 99)  # not auto any more: kept
    assert cfg.zero_optimization.reduce_bucket_size == 1234
    with pytest.raises(ConfigError, match="train_batch_size"):
        cfg.assert_no_auto()
    assert AUTO == "auto"


def test_a_typo_in_auto_is_an_error():
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        parse_config(Root, {"zero_optimization": {"reduce_bucket_size": "autoo"}})
