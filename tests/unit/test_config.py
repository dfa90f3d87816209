"""Config loading: YAML and raw dicts, overrides, and errors that name the field, value and what is allowed."""

import copy
from pathlib import Path

import pytest
import yaml

from posttrain.config import RunConfig, apply_overrides, dump_config, load_config
from posttrain.errors import ConfigError

BASE = {
    "model": {"name_or_path": "some/model"},
    "method": "sft",
    "data": {"train": [{"path": "train.jsonl", "format": "messages"}]},
    "training": {"batch_size": 2},
    "output_dir": "out",
}


def raw(**changes) -> dict:
    """A deep copy of BASE with ``section={...}`` entries merged in."""
    out = copy.deepcopy(BASE)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# --- loading -------------------------------------------------------------------------------


def test_loads_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        """
model:
  name_or_path: some/model
method: sft
data:
  train: [{path: train.jsonl, format: alpaca}]
  max_seq_len: 256
training:
  learning_rate: 1e-4
  max_steps: 7
  lr_scheduler: linear
output_dir: out
""",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name_or_path == "some/model"
    assert cfg.data.train[0].format == "alpaca"
    assert cfg.data.max_seq_len == 256
    assert cfg.training.max_steps == 7
    assert cfg.training.lr_scheduler == "linear"
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.tuning.mode == "full"  # a default


def test_loads_a_raw_dict_without_changing_it():
    given = raw()
    before = copy.deepcopy(given)
    cfg = load_config(None, ["training.max_steps=5", "training.seed=3"], raw=given)
    assert cfg.training.max_steps == 5 and cfg.training.seed == 3 and cfg.training.batch_size == 2
    assert given == before  # overrides go into a copy, not into the caller's nested sections


def test_missing_file_is_a_config_error(tmp_path):
    assert "not found" in config_error(path=tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    assert "mapping" in config_error(path=path)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, raw=raw())
    again = load_config(write_yaml(tmp_path / "dumped.yaml", yaml.safe_load(dump_config(cfg))))
    assert again.model_dump() == cfg.model_dump()


# --- errors --------------------------------------------------------------------------------


def test_unknown_top_level_key_is_named(tmp_path):
    msg = config_error(path=write_yaml(tmp_path / "run.yaml", raw(outptu_dir="x")))
    assert "outptu_dir: unknown key" in msg
    assert "run.yaml" in msg  # the error says which file


def test_unknown_nested_key_is_named_with_its_dotted_path():
    msg = config_error(path=None, raw=raw(training={"learnig_rate": 1e-3}))
    assert "training.learnig_rate: unknown key" in msg
    assert "check the spelling" in msg


def test_unknown_key_inside_a_list_item_is_named():
    msg = config_error(path=None, raw=raw(data={"train": [{"path": "a.jsonl", "fromat": "text"}]}))
    assert "data.train[0].fromat: unknown key" in msg


def test_bad_enum_names_field_value_and_allowed_values():
    msg = config_error(path=None, raw=raw(training={"lr_scheduler": "cosin"}))
    line = next(ln for ln in msg.splitlines() if "training.lr_scheduler" in ln)
    assert "'cosin'" in line
    for allowed in ("'cosine'", "'linear'", "'constant'"):
        assert allowed in line


def test_bad_enum_in_a_list_item():
    msg = config_error(path=None, raw=raw(data={"train": [{"path": "a.jsonl", "format": "csv"}]}))
    line = next(ln for ln in msg.splitlines() if "data.train[0].format" in ln)
    assert "'csv'" in line and "'alpaca'" in line and "'messages'" in line and "'text'" in line


def test_wrong_type_names_field_and_value():
    msg = config_error(path=None, raw=raw(training={"max_steps": "lots"}))
    line = next(ln for ln in msg.splitlines() if "training.max_steps" in ln)
    assert "'lots'" in line and "integer" in line


def test_wrong_type_for_a_union_field_is_one_line_on_the_real_field():
    msg = config_error(path=None, raw=raw(tuning={"lora": {"target_modules": 5}}))
    lines = [ln for ln in msg.splitlines() if "target_modules" in ln]
    assert len(lines) == 1
    assert lines[0].strip().startswith("tuning.lora.target_modules: given 5;")
    assert "string" in lines[0] and "list" in lines[0]


def test_out_of_range_value_names_field_and_bound():
    msg = config_error(path=None, raw=raw(training={"learning_rate": -1}))
    line = next(ln for ln in msg.splitlines() if "training.learning_rate" in ln)
    assert "-1" in line and "greater than 0" in line


def test_missing_required_fields_are_each_named():
    given = raw()
    del given["output_dir"]
    del given["model"]["name_or_path"]
    msg = config_error(path=None, raw=given)
    assert "output_dir: required, not given" in msg
    assert "model.name_or_path: required, not given" in msg


def test_every_problem_is_reported_at_once():
    msg = config_error(path=None, raw=raw(training={"lr_scheduler": "x", "max_steps": 0, "learnig_rate": 1}))
    assert "training.lr_scheduler" in msg and "training.max_steps" in msg and "training.learnig_rate" in msg


def test_freeze_without_targets_is_an_error():
    msg = config_error(path=None, raw=raw(tuning={"mode": "freeze"}))
    assert "tuning.mode=freeze needs" in msg
    assert "train_top_layers" in msg and "train_modules" in msg
    ok = load_config(None, raw=raw(tuning={"mode": "freeze", "freeze": {"train_top_layers": 1}}))
    assert ok.tuning.freeze.train_top_layers == 1


def test_early_stopping_without_eval_steps_is_an_error():
    assert "eval_steps" in config_error(path=None, raw=raw(training={"early_stopping_patience": 2}))


# --- overrides -----------------------------------------------------------------------------


def test_overrides_parse_to_int_bool_float():
    out = apply_overrides(
        {}, ["training.max_steps=5", "data.packing=true", "training.learning_rate=1e-4", "training.adam_eps=1.0e-6"]
    )
    assert out["training"]["max_steps"] == 5 and type(out["training"]["max_steps"]) is int
    assert out["data"]["packing"] is True
    assert type(out["training"]["learning_rate"]) is float and out["training"]["learning_rate"] == 1e-4
    assert out["training"]["adam_eps"] == 1e-6
    cfg = load_config(None, ["training.max_steps=5", "data.packing=true", "training.learning_rate=1e-4"], raw=raw())
    assert cfg.training.max_steps == 5 and cfg.data.packing is True and cfg.training.learning_rate == 1e-4


def test_overrides_parse_lists_and_keep_strings():
    out = apply_overrides({}, ["tuning.lora.target_modules=[q_proj, v_proj]", "output_dir=runs/a"])
    assert out["tuning"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert out["output_dir"] == "runs/a"


def test_override_replaces_a_yaml_value(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", raw(training={"max_steps": 100}))
    assert load_config(path, ["training.max_steps=3"]).training.max_steps == 3


def test_override_into_a_non_section_is_an_error():
    with pytest.raises(ConfigError, match="output_dir.*not a section"):
        load_config(None, ["output_dir.sub=1"], raw=raw())
    with pytest.raises(ConfigError, match="name_or_path.*not a section"):
        load_config(None, ["model.name_or_path.x=1"], raw=raw())


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["training.max_steps"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["=5"])


def test_override_with_a_typo_is_an_unknown_key():
    assert "training.max_step: unknown key" in config_error(path=None, overrides=["training.max_step=5"], raw=raw())


# --- data sources --------------------------------------------------------------------------


def test_single_string_data_source_is_accepted():
    cfg = load_config(None, raw=raw(data={"train": "train.jsonl", "eval": "eval.jsonl"}))
    assert [s.path for s in cfg.data.train] == ["train.jsonl"]
    assert cfg.data.train[0].format == "messages" and cfg.data.train[0].weight == 1.0
    assert [s.path for s in cfg.data.eval] == ["eval.jsonl"]


def test_list_of_strings_and_single_mapping_are_accepted():
    cfg = load_config(None, raw=raw(data={"train": ["a.jsonl", {"path": "b.jsonl", "format": "text"}]}))
    assert [(s.path, s.format) for s in cfg.data.train] == [("a.jsonl", "messages"), ("b.jsonl", "text")]
    cfg = load_config(None, raw=raw(data={"train": {"path": "c.jsonl", "weight": 2}}))
    assert [(s.path, s.weight) for s in cfg.data.train] == [("c.jsonl", 2.0)]


def test_empty_train_list_is_an_error():
    assert "data.train" in config_error(path=None, raw=raw(data={"train": []}))


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    (folder / "data" / "eval.jsonl").write_text("{}\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a path relative to the working directory would not exist
    path = write_yaml(folder / "run.yaml", raw(data={"train": "data/train.jsonl", "eval": ["data/eval.jsonl"]}))
    cfg = load_config(path)
    assert Path(cfg.data.train[0].path) == (folder / "data" / "train.jsonl").resolve()
    assert Path(cfg.data.eval[0].path) == (folder / "data" / "eval.jsonl").resolve()
    assert Path(cfg.data.train[0].path).is_file()


def test_absolute_data_paths_are_kept(tmp_path):
    data = tmp_path / "abs.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    sub = tmp_path / "cfg"
    sub.mkdir()
    cfg = load_config(write_yaml(sub / "run.yaml", raw(data={"train": str(data)})))
    assert cfg.data.train[0].path == str(data)


def test_a_numeric_override_of_a_name_field_is_a_name():
    from posttrain.config import load_config

    cfg = load_config(None, ["output_dir=2024"], raw=raw())
    assert cfg.output_dir == "2024"
