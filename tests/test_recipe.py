"""Recipe validation: every error names its key path, at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedistill.base.errors import RecipeError
from edgedistill.recipe.schema import apply_override, dump_recipe, load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe, monkeypatch):
    # recipes that point at ../shared, or at the user's ImageNet copy, must still *parse*: only that path may be missing
    try:
        load_recipe(recipe)
    except RecipeError as e:
        assert "not found" in str(e) and ("shared" in str(e) or "data.root: /data/imagenet" in str(e)), e


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
        ({"device": "gpu"}, "device", "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ({"device": "cuda:x"}, "device", "expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        ({"validate": {"atol": 0}}, "validate.atol", "greater than 0"),
        ({"name": "a/b"}, "name", "letters, digits, '_', '.' and '-'"),
        ({"name": ""}, "name", "starting with a letter or digit"),
        # types and unions in plain words
        ({"teacher": {"small_input": "maybe"}}, "teacher.small_input", "expected true, false or 'auto', got 'maybe'"),
        ({"augment": {"fraction": "half"}}, "augment.fraction", "expected a number or 'auto', got 'half'"),
        ({"data": 3}, "data", "expected a section of keys (a mapping), got 3"),
        ({"distill": {"loss": "kd"}}, "distill.loss", "expected a section of keys"),
        ({"teacher": {"normalize": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}}, "teacher.normalize.mean", "expected 3 values, got [0.5, 0.5]"),
        ({"teacher": {"normalize": {"mean": [0.5, 0.5, 0.5]}}}, "teacher.normalize.std", "missing"),
        ({"teacher": {"path": 3}}, "teacher.path", "expected a file path, got 3"),
        ({"export": {"formats": [3]}}, "export.formats[0]", "expected a string, got 3"),
        ({"energy": {"direction": "backwards"}}, "energy.direction", "expected 'paper' or 'reversed', got 'backwards'"),
        ({"seed": 1.5}, "seed", "expected a whole number, got 1.5"),
        ({"distill": {"loss": {"name": "kd", "temperature": "hot"}}}, "distill.loss.temperature", "expected a number, got 'hot'"),
        ({"distill": {"loss": {"name": "mlkd", "temperatures": "many"}}}, "distill.loss.temperatures", "expected a list of numbers"),
        # keys the rest of the recipe would ignore
        ({"data": {"source": "digits", "root": __file__}}, "data.root", "data source 'digits' reads no files"),
        ({"data": {"root": __file__}}, "data.source", "not set, but data.root is"),
        ({"data": {"source": "npz"}}, "data.root", "'npz' needs a .npz file"),
        ({"data": {"source": "npz", "root": str(ROOT / "tests")}}, "data.root", "is a folder, expected a .npz file"),
        ({"data": {"source": "npz", "root": "/nonexistent/d.npz"}}, "data.root", "not found (expected a .npz file)"),
        ({"data": {"source": "cifar10", "root": __file__}}, "data.root", "is a file, expected a folder holding torchvision's CIFAR-10 files"),
        ({"data": {"source": "cifar100"}}, "data.root", "needs a folder"),
        ({"data": {"source": "imagefolder", "root": __file__}}, "data.root", "is a file, expected a folder with train/ and test/"),
        ({"teacher": {"source": "train", "path": __file__}}, "teacher.path", "'train' trains its teacher here and reads no file"),
        ({"teacher": {"source": "onnx", "path": __file__, "arch": "resnet18"}}, "teacher.arch", "would be ignored"),
        ({"teacher": {"source": "torchscript", "path": __file__, "small_input": True}}, "teacher.small_input", "would be ignored"),
        ({"teacher": {"source": "export", "path": __file__, "train": {"epochs": 3}}}, "teacher.train", "only source 'train' trains one"),
        ({"teacher": {"source": "onnx", "path": str(ROOT)}}, "teacher.path", "is a folder, expected an ONNX model file"),
        ({"teacher": {"source": "torchvision", "path": __file__, "arch": "resnet1000"}}, "teacher.arch", "or a torchvision classifier (did you mean"),
        ({"teacher": {"arch": "resnet1000"}}, "teacher.arch", "or a torchvision classifier"),
        ({"augment": {"fraction": 0.2, "budget": {"max_overhead": 0.2}}}, "augment.budget", "fixed at 0.2"),
        ({"augment": {"selection": "all", "fraction": 0.3}}, "augment.fraction", "selection 'all'"),
        ({"augment": {"selection": "all", "fraction": "auto", "budget": {"max_minutes": 3}}}, "augment.fraction", "selection 'all'"),
        ({"augment": {"selection": "all", "budget": {"max_minutes": 3}}}, "augment.budget", "selection 'all'"),
        ({"augment": {"selection": "low"}}, "augment.selection", "augment.fraction is 0"),
        ({"augment": {"weight": 0.5}}, "augment.weight", "augment.fraction is 0"),
        ({"distill": {"schedule": {"milestones": [3]}}}, "distill.schedule.milestones", "only the multistep schedule"),
        ({"teacher": {"train": {"schedule": {"name": "constant", "gamma": 0.5}}}}, "teacher.train.schedule.gamma", "only the multistep schedule"),
        ({"distill": {"optimizer": {"name": "adamw", "momentum": 0.8}}}, "distill.optimizer.momentum", "only sgd uses it"),
        ({"distill": {"optimizer": {"name": "adamw", "nesterov": False}}}, "distill.optimizer.nesterov", "only sgd uses it"),
        ({"student": {"arch": "shufflenet_v2_x0_5", "width": 0.5}}, "student.width", "no width multiplier"),
        ({"student": {"arch": "shufflenet_v2_x1_0", "dropout": 0.1}}, "student.dropout", "no dropout"),
        ({"export": {"formats": ["fp32"], "int8": {"calibration": {"samples": 64}}}}, "export.int8", "no int8 target"),
        ({"export": {"formats": ["fp32", "fp16"], "int8": {"fallback": False}}}, "export.int8", "add one (executorch_int8, int8, litert_int8)"),
        ({"export": {"formats": ["fp32"]}, "validate": {"max_int8_drop": 2}}, "validate.max_int8_drop", "no int8"),
        ({"validate": {"max_fp16_drop": 2}}, "validate.max_fp16_drop", "no fp16"),
        ({"device": "cpu", "teacher": {"train": {"sync_bn": True}}}, "teacher.train.sync_bn", "device is cpu"),
        ({"energy": {"direction": "reversed"}, "distill": {"loss": {"name": "kd"}}}, "energy.direction", "loss 'kd' uses no energy groups"),
        ({"energy": {"grouping": "dynamic"}, "distill": {"loss": {"name": "ce"}}}, "energy.grouping", "loss 'ce' uses no energy groups"),
    ],
)
def test_bad_recipes_name_the_key(raw, key, expected):
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    msg = str(e.value)
    assert f"{key}:" in msg or f"'{key.strip(chr(39))}'" in msg, msg
    assert expected in msg, msg
    assert "\n" not in msg
    for internal in ("pattern", "constrained-", "literal[", "instance of", "<class", "Value error", "function-after", "valid dictionary"):
        assert internal not in msg, msg


def test_loss_params_are_coerced_to_the_signature_types():
    r = validate_recipe({"distill": {"loss": {"name": "mlkd", "temperatures": [2, 4]}}})
    assert r.distill.loss.params["temperatures"] == (2.0, 4.0)
    r = validate_recipe({"distill": {"loss": {"name": "kd", "temperature": "3"}}})
    assert r.distill.loss.params["temperature"] == 3.0


def test_overrides_reach_nested_keys_and_parse_yaml_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  source: digits\ndistill:\n  epochs: 3\n")
    r = load_recipe(p, ["distill.epochs=7", "export.formats=[fp32, fp16]", "distill.loss.temperature=5"])
    assert r.name == "r" and r.distill.epochs == 7 and r.export.formats == ["fp32", "fp16"]
    assert r.distill.loss.params["temperature"] == 5.0
    with pytest.raises(RecipeError, match="distill.epoch"):
        load_recipe(p, ["distill.epoch=3"])
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_override({}, "novalue")


def test_set_null_removes_a_key_or_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data: {source: digits}\nteacher: {source: train, arch: resnet18, train: {epochs: 9}}\n"
                 "student: {arch: auto, target: {max_size_mb: 1.0}}\n")
    (tmp_path / "t.onnx").write_bytes(b"onnx")
    # a file teacher on top of a recipe that trains one: its train section must go
    with pytest.raises(RecipeError, match="remove teacher.train"):
        load_recipe(p, ["teacher.source=onnx", f"teacher.path={tmp_path / 't.onnx'}", "teacher.arch="])
    r = load_recipe(p, ["teacher.source=onnx", f"teacher.path={tmp_path / 't.onnx'}", "teacher.arch=", "teacher.train=null"])
    assert r.teacher.source == "onnx" and r.teacher.arch is None
    assert load_recipe(p, ["student.target=null", "student.arch=mobilenet_v2"]).student.target is None
    raw = {"seed": 1}
    apply_override(raw, "export.int8.calibration=null")
    assert raw == {"seed": 1}, "removing a key below absent sections creates none"
    with pytest.raises(RecipeError, match="data.source: not set; a recipe must say what it distills"):  # required
        load_recipe(p, ["data.source=null"])


def test_the_old_calibration_key_says_where_it_moved():
    with pytest.raises(RecipeError, match=r"export.calibration: moved to export.int8.calibration"):
        validate_recipe({"export": {"calibration": {"samples": 64}}})
    assert validate_recipe({"export": {"formats": ["fp32", "executorch_int8"] if _has("executorch") else ["fp32", "int8"],
                                       "int8": {"granularity": "per_tensor"}}}).export.int8.granularity == "per_tensor"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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


# ---------------------------------------------------------------- files that are not recipes


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.yaml", b"", "the recipe is empty; start from recipes/quickstart.yaml"),
        ("comments.yaml", b"# nothing\n  # here\n", "the recipe is empty"),
        ("braces.yaml", b"{}\n", "the recipe is empty"),
        ("binary.yaml", bytes(range(256)), "not a YAML recipe (not UTF-8 text)"),
        ("latin1.yaml", "name: caf\xe9\n".encode("latin-1"), "not a YAML recipe (not UTF-8 text)"),
        ("nul.yaml", b"data: {source: digits}\n\x00\x00", "not a YAML recipe (not UTF-8 text)"),
        ("model.onnx", b"\x08\x07\x12\x07pytorch\x1a\x03\xff\xfe", "not a YAML recipe (a .onnx file is an ONNX model"),
        ("text.onnx", b"data: {source: digits}\n", "a .onnx file is an ONNX model"),
        ("weights.pt", b"PK\x03\x04", "a .pt file is a PyTorch file"),
        ("data.npz", b"PK\x03\x04", "a .npz file is a NumPy archive; a recipe names it as data.root"),
        ("scalar.yaml", b"hello\n", "expected a mapping of sections at the top level, got a string"),
        ("dup.yaml", b"data: {source: digits}\nseed: 1\ndata: {source: npz}\n", "line 3: key 'data' is given twice (first on line 1)"),
        ("dup_nested.yaml", b"data:\n  source: digits\n  batch_size: 8\n  batch_size: 16\n", "line 4: key 'batch_size' is given twice"),
        ("nodata.yaml", b"seed: 3\n", "data.source: not set; a recipe must say what it distills"),
        ("nosource.yaml", b"data: {batch_size: 8}\n", "data.source: not set"),
        ("bad name.yaml", b"data: {source: digits}\n", "name: not set, and the file name 'bad name' cannot name the run folder"),
    ],
)
def test_files_that_are_not_recipes(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and expected in msg, msg
    assert "\n" not in msg


def test_a_folder_is_not_a_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="is a folder, expected a YAML recipe file"):
        load_recipe(tmp_path)


def test_the_minimal_recipe_names_its_data(tmp_path):
    p = tmp_path / "min.yaml"
    p.write_text("data: {source: digits}\n")
    r = load_recipe(p)
    assert r.name == "min" and r.data.source == "digits"
    p.write_text("seed: 1\n")
    assert load_recipe(p, ["data.source=digits"]).seed == 1  # --set may name it
    (tmp_path / "bad name.yaml").write_text("data: {source: digits}\n")
    assert load_recipe(tmp_path / "bad name.yaml", ["name=ok"]).name == "ok"


def test_a_utf8_bom_is_fine(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbfdata: {source: digits}\n")
    assert load_recipe(p).data.source == "digits"


@pytest.mark.parametrize(
    "item, expected",
    [
        ("data..root=x", "has an empty part"),
        (".seed=1", "has an empty part"),
        ("=1", "expected key.path=value"),
        ("data={source: npz, source: digits}", "key 'source' is given twice"),
    ],
)
def test_malformed_overrides(item, expected):
    with pytest.raises(RecipeError, match=expected):
        apply_override({}, item)


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "keys, msg, expected",
    [
        (["export", "formats"], "formats: duplicates in [fp32, fp32]", "export.formats: duplicates in [fp32, fp32]"),
        (["distill"], "schedule.milestones: 7 is beyond epochs=5", "distill.schedule.milestones: 7 is beyond epochs=5"),
        (["distill", "schedule"], "schedule.milestones: x", "distill.schedule.milestones: x"),
        (["distill", "loss"], "t_minus: must be > 0", "distill.loss.t_minus: must be > 0"),
        (["teacher"], "path: /x.onnx not found", "teacher.path: /x.onnx not found"),
        (["export", "formats"], "fp32: is not a key here", "export.formats: fp32: is not a key here"),
        ([], "validate.max_int8_drop: no int8", "validate.max_int8_drop: no int8"),
        ([], "give exactly one", "give exactly one"),
    ],
)
def test_a_validator_key_prefix_is_never_doubled(keys, msg, expected):
    from edgedistill.recipe.text import _with_subkey
    from edgedistill.recipe.schema import Recipe

    assert _with_subkey(keys, msg, {}, Recipe) == expected


# ---------------------------------------------------------------- what counts as given


def test_a_key_at_its_default_is_not_given():
    """The resolved recipe.yaml of a run folder lists every key with its default: it must load again."""
    r = validate_recipe({"teacher": {"source": "onnx", "path": __file__, "small_input": "auto", "arch": None, "train": {"epochs": 10}},
                         "augment": {"fraction": 0.0, "selection": "high", "weight": 1.0, "budget": None},
                         "distill": {"optimizer": {"name": "adamw", "momentum": 0.9}, "schedule": {"milestones": [], "gamma": 0.1}},
                         "export": {"formats": ["fp32"], "int8": {"calibration": {"samples": 512}}}, "validate": {"max_int8_drop": 1.0}})
    assert r.teacher.source == "onnx"


@pytest.mark.parametrize("loss", ["energy_kd", "energy_dkd", "energy_mlkd", "graded_kd"])
def test_energy_losses_read_direction_and_grouping(loss):
    r = validate_recipe({"energy": {"direction": "reversed", "grouping": "dynamic"}, "distill": {"loss": {"name": loss}}})
    assert r.energy.direction == "reversed"


def test_resolved_file_teacher_recipe_round_trips(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros(1))
    r = validate_recipe({"name": "f", "data": {"source": "npz", "root": str(tmp_path / "d.npz")},
                         "teacher": {"source": "onnx", "path": __file__}, "export": {"formats": ["fp32"]}})
    p = tmp_path / "f.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r


def test_every_data_source_declares_its_root():
    from edgedistill.data.sources import DATA_SOURCES

    for name in DATA_SOURCES.names():
        spec = DATA_SOURCES.get(name)
        assert spec.root in ("file", "folder", None) and callable(spec.load)
        assert (spec.root is None) == (not spec.what), name


def test_every_teacher_source_says_what_it_reads():
    from edgedistill.models.teachers import TEACHERS

    for name in TEACHERS.names():
        spec = TEACHERS.get(name)
        assert spec.needs_path != spec.trained_here, name
        assert not spec.needs_arch or spec.takes_arch or spec.timm, name
