"""Params are validated on load: unknown keys, wrong types, out-of-range values, impossible chains."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core.errors import ParamsError
from pipeline.params import (
    ExportParams,
    GenParams,
    TrainParams,
    generation_seed,
    parse_chain,
    parse_generation,
    parse_section,
    section_of,
    student_keys,
)
from stages.common import ParamsFile
from tests.conftest import tiny_params


def test_repo_params_yaml_is_valid() -> None:
    ParamsFile.load("params.yaml").validate()


@pytest.mark.parametrize(
    ("cls", "raw", "needle"),
    [
        (TrainParams, {"epochs": 0}, "train.epochs = 0: must be >= 1"),
        (TrainParams, {"epochs": "ten"}, "train.epochs = 'ten': expected int"),
        (TrainParams, {"lr": 0}, "train.lr = 0.0: must be > 0.0"),
        (TrainParams, {"optimizer": "lamb"}, "allowed values are sgd, adam, adamw"),
        (TrainParams, {"arch": "resnet9000"}, "train.arch = 'resnet9000'"),
        (TrainParams, {"deterministic": 1}, "expected bool"),
        (TrainParams, {"epoch": 3}, "train.epoch: unknown key"),
        (GenParams, {"temperature": 0}, "temperature = 0.0: must be > 0.0"),
        (GenParams, {"temperature": -1.5}, "must be > 0.0"),
        (GenParams, {"alpha": 1.5}, "alpha = 1.5: must be >= 0.0 and <= 1.0"),
        (GenParams, {"loss": "l2"}, "allowed values are ce, ban, ban+l, kd, cwtm, dkpp, dkd, mse"),
        (GenParams, {"beta": -1}, "beta = -1.0: must be >= 0.0"),
        (ExportParams, {"dtype": "bfloat16"}, "allowed values are float16, float32"),
        # a torchvision name is not bancache's CIFAR resnet{6n+2}: the message names the tv_ spelling
        (TrainParams, {"arch": "resnet18"}, "depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got 18. "),
        (TrainParams, {"arch": "resnet18"}, "For torchvision's resnet18, write 'tv_resnet18'"),
        (TrainParams, {"arch": "vgg11"}, "unknown architecture. For torchvision's vgg11, write 'tv_vgg11'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(cls, raw, needle) -> None:
    section = {TrainParams: "train", GenParams: "gen", ExportParams: "export"}[cls]
    with pytest.raises(ParamsError) as e:
        parse_section(cls, section, raw)
    assert needle in str(e.value)


def test_names_without_a_torchvision_model_get_no_tv_hint() -> None:
    for arch in ("resnet21", "nosuchnet"):
        with pytest.raises(ParamsError) as e:
            TrainParams(arch=arch)
        assert "tv_" + arch not in str(e.value)


def test_a_parsed_section_is_checked_once_naming_the_section_parsed() -> None:
    """parse_section builds the object, whose own check runs under the parsed section's name (students.2,
    not the class's default students.K); one error, the first bad key of the file."""
    with pytest.raises(ParamsError, match=r"^students\.2\.temperature = 0\.0: must be > 0\.0$"):
        parse_generation(2, {"teacher": 1, "temperature": 0})
    with pytest.raises(ParamsError, match=r"^students\.K\.temperature = 0\.0"):
        GenParams(temperature=0)
    with pytest.raises(ParamsError, match=r"^train\.batch_size = 'x': expected int$"):
        parse_section(TrainParams, "train", {"batch_size": "x", "lr": "y"})


def test_ints_are_accepted_where_floats_are_expected() -> None:
    assert parse_section(GenParams, "g", {"temperature": 2}).temperature == 2.0


def test_chain_rules() -> None:
    with pytest.raises(ParamsError, match="generation 0 trains from labels"):
        parse_generation(0, {"loss": "ban"})
    with pytest.raises(ParamsError, match=r"students.2.teacher = 2: a teacher must be an earlier generation"):
        parse_generation(2, {"teacher": 2})
    with pytest.raises(ParamsError, match=r"students.1.teacher: unset"):
        parse_generation(1, {"loss": "ban"})
    with pytest.raises(ParamsError, match=r"students.3.teacher = 2: no such generation"):
        parse_chain({}, {"1": {"teacher": 0}, "3": {"teacher": 2}})
    with pytest.raises(ParamsError, match="quoted strings"):
        student_keys({1: {"teacher": 0}})  # an unquoted YAML key is an int; DVC's foreach would skip it
    chain = parse_chain({}, {"1": {"teacher": 0}, "2": {"teacher": 0, "loss": "kd"}})
    assert chain.gens[2].teacher == 0 and sorted(chain.gens) == [0, 1, 2]


def test_params_file_rejects_unknown_section(tmp_path) -> None:
    raw = tiny_params()
    raw["trian"] = {}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="unknown section 'trian'"):
        ParamsFile.load(p).validate()


def _declared_params() -> dict[str, set[str]]:
    """Params each stage declares in dvc.yaml, with foreach expanded over the tiny config's students."""
    stages = yaml.safe_load(open("dvc.yaml"))["stages"]
    out = {}
    for name, st in stages.items():
        if "foreach" in st:
            for key in tiny_params()["students"]:
                out[f"{name}@{key}"] = {p.replace("${key}", key) for p in st["do"].get("params", [])}
        else:
            out[name] = set(st.get("params", []))
    return out


def test_each_stage_reads_only_the_params_dvc_yaml_declares(project) -> None:
    from stages import ensemble, export, train

    declared = _declared_params()
    runs = {
        "teacher": lambda p: train.run(p, project, 0),
        "export_teacher": lambda p: export.run(p, project, 0),
        "train@1": lambda p: train.run(p, project, 1),
        "export@1": lambda p: export.run(p, project, 1),
        "train@2": lambda p: train.run(p, project, 2),
        "export@2": lambda p: export.run(p, project, 2),
        "ensemble": lambda p: ensemble.run(p, project),
    }
    for stage, fn in runs.items():
        p = ParamsFile(tiny_params())
        fn(p)
        assert p.used <= declared[stage], f"{stage} reads {p.used - declared[stage]} not declared in dvc.yaml"


def test_section_and_seed_of_a_generation() -> None:
    assert section_of(0) == "gen0" and section_of(3) == "students.3"
    recipe = TrainParams(seed=10)
    assert generation_seed(recipe, 0, GenParams(loss="ce")) == 10
    assert generation_seed(recipe, 2, GenParams(teacher=1)) == 12  # train.seed + K
    assert generation_seed(recipe, 2, GenParams(teacher=1, seed=5)) == 5  # the generation's own seed wins


def test_exponent_numbers_read_as_floats_as_dvc_reads_them(tmp_path) -> None:
    """YAML 1.2 (ruamel.yaml, DVC's parser): `2e-3` is a float; PyYAML (YAML 1.1) reads it as a string."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: 2e-3\n  weight_decay: 5E-4\nstudents:\n  '1': {teacher: 0, temperature: 1e0}\n")
    assert isinstance(yaml.safe_load(p.read_text())["train"]["lr"], str)  # the bug this guards against
    params = ParamsFile.load(p)
    params.validate()
    recipe = parse_section(TrainParams, "train", params.get("train"))
    assert (recipe.lr, recipe.weight_decay) == (0.002, 0.0005)
    assert parse_generation(1, params.get("students.1")).temperature == 1.0


def test_repo_params_yaml_spells_out_every_key_a_stage_reads() -> None:
    """`dvc exp run -S students.2.temperature=2` fails when the key is absent, so params.yaml lists every
    field of every section (the value there is what the stage uses)."""
    import dataclasses

    from pipeline.params import DataParams, InspectParams, LaunchParams

    raw = ParamsFile.load("params.yaml").raw
    sections = {
        "data": DataParams,
        "train": TrainParams,
        "export": ExportParams,
        "launch": LaunchParams,
        "inspect": InspectParams,
        "gen0": GenParams,
        **{f"students.{k}": GenParams for k in raw["students"]},
    }
    for section, cls in sections.items():
        node = raw
        for part in section.split("."):
            node = node[part]
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in node]
        assert not missing, f"params.yaml section {section} lacks {missing}"
