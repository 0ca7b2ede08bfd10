"""Recipe validation: every error names its key path, at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedistill.errors import RecipeError
from edgedistill.recipe import apply_override, dump_recipe, load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe, monkeypatch):
    # recipes that point at ../shared must still *parse*; path checks are skipped when it is absent
    try:
        load_recipe(recipe)
    except RecipeError as e:
        assert "not found" in str(e) and "shared" in str(e), e


@pytest.mark.parametrize(
    "raw, key, expected",
    [
        ({"dat": {}}, "'dat'", "did you mean 'data'"),
        ({"data": {"batch_sise": 3}}, "data.batch_sise", "did you mean 'batch_size'"),
        ({"distill": {"loss": {"name": "energy_kd", "temprature": 3}}}, "distill.loss.temprature", "did you mean 'temperature'"),
        ({"data": {"batch_size": "many"}}, "data.batch_size", "integer"),
        ({"energy": {"fraction": 0.7}}, "energy.fraction", "less than or equal to 0.5"),
        ({"energy": {"temperature": 0}}, "energy.temperature", "greater than 0"),
        ({"distill": {"loss": {"name": "energy_kd", "t_minus": -4}}}, "distill.loss.t_minus", "must be > 0"),
        ({"distill": {"loss": {"name": "energy_kd", "temperature": 2, "t_minus": -2.5}}}, "distill.loss.t_minus", "must be > 0"),
        ({"distill": {"loss": {"name": "kdd"}}}, "distill.loss.name", "did you mean 'kd'"),
        ({"student": {"arch": "mobilenetv2"}}, "student.arch", "did you mean 'mobilenet_v2'"),
        ({"data": {"source": "cifar"}}, "data.source", "known:"),
        ({"augment": {"method": "cutmx"}}, "augment.method", "did you mean 'cutmix'"),
        ({"augment": {"fraction": "auto"}}, "augment.fraction", "needs a budget"),
        ({"augment": {"fraction": 1.5}}, "augment.fraction", "1"),
        ({"augment": {"budget": {"max_overhead": 0.1, "max_minutes": 5}}}, "augment.budget", "exactly one"),
        ({"augment": {"budget": {}}}, "augment.budget", "exactly one"),
        ({"augment": {"budget": {"max_overhead": -0.1}}}, "augment.budget.max_overhead", "greater than 0"),
        ({"augment": {"budget": {"max_minutes": 0}}}, "augment.budget.max_minutes", "greater than 0"),
        ({"augment": {"budget": {"max_hours": 2}}}, "augment.budget.max_hours", "did you mean"),
        ({"export": {"formats": []}}, "export.formats", "at least 1"),
        ({"export": {"formats": ["int8"]}}, "export.formats", "fp32 is required"),
        ({"export": {"formats": ["fp32", "int4"]}}, "export.formats", "int8"),
        ({"export": {"opset": 13}}, "export.opset", "18"),
        ({"distill": {"epochs": 0}}, "distill.epochs", "greater than or equal to 1"),
        ({"distill": {"schedule": {"name": "multistep"}}}, "distill.schedule.milestones", "at least one"),
        ({"distill": {"loss": {"name": "mlkd", "temperatures": []}}}, "distill.loss", "temperatures"),
        ({"teacher": {"source": "onnx"}}, "teacher.path", "needs a file path"),
        ({"teacher": {"source": "onnx", "path": "/nonexistent/t.onnx"}}, "teacher.path", "not found"),
        ({"teacher": {"source": "torchvision", "path": __file__}}, "teacher.arch", "needs an architecture"),
        ({"device": "gpu"}, "device", "auto|cpu|cuda"),
        ({"validate": {"atol": 0}}, "validate.atol", "greater than 0"),
        ({"name": "a/b"}, "name", "pattern"),
    ],
)
def test_bad_recipes_name_the_key(raw, key, expected):
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    msg = str(e.value)
    assert key in msg and expected in msg
    assert "\n" not in msg


def test_loss_params_are_coerced_to_the_signature_types():
    r = validate_recipe({"distill": {"loss": {"name": "mlkd", "temperatures": [2, 4]}}})
    assert r.distill.loss.params["temperatures"] == (2.0, 4.0)
    r = validate_recipe({"distill": {"loss": {"name": "kd", "temperature": "3"}}})
    assert r.distill.loss.params["temperature"] == 3.0


def test_overrides_reach_nested_keys_and_parse_yaml_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("distill:\n  epochs: 3\n")
    r = load_recipe(p, ["distill.epochs=7", "export.formats=[fp32, fp16]", "distill.loss.temperature=5"])
    assert r.name == "r" and r.distill.epochs == 7 and r.export.formats == ["fp32", "fp16"]
    assert r.distill.loss.params["temperature"] == 5.0
    with pytest.raises(RecipeError, match="distill.epoch"):
        load_recipe(p, ["distill.epoch=3"])
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_override({}, "novalue")


def test_resolved_recipe_round_trips(tmp_path):
    r = validate_recipe({"name": "x", "distill": {"loss": {"name": "energy_dkd", "beta": 6}}})
    p = tmp_path / "x.yaml"
    p.write_text(dump_recipe(r))
    again = load_recipe(p)
    assert again == r and again.digest() == r.digest()


@pytest.mark.parametrize("text, expected", [("a: [1, 2", "not valid YAML"), ("- 1\n- 2\n", "mapping")])
def test_malformed_yaml_files(tmp_path, text, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_tags_never_execute(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
