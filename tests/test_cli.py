"""The command line on the built-in model, offline."""

import json

from typer.testing import CliRunner

from mitigate.cli import app

runner = CliRunner()


def test_run_prints_both_answers_and_the_moved_mass():
    result = runner.invoke(
        app, ["run", "--model", "builtin:tiny-llava", "--method", "var", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "vanilla" in result.output and "var-tiny" in result.output
    assert "mass moved" in result.output and "edited query rows" in result.output


def test_run_bad_method_fails_cleanly():
    result = runner.invoke(app, ["run", "--method", "nope", "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert "unknown method" in result.output and "Traceback" not in result.output


def test_run_set_overrides():
    result = runner.invoke(app, ["run", "--set", "tau=1.5", "--set", "layers=[3]", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "tau=1.5" in result.output and "layers=[3]" in result.output


def test_methods_lists_presets_with_sources():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    var = data["var"]["presets"]["var"]
    assert var["params"]["tau"] == 20 and "VisAttnSink" in var["sources"]["tau"]
    assert set(data["var"]["parameters"]) >= {"sink_dims", "tau", "moved_fraction", "layers"}


def test_calibrate_recommends_dims():
    result = runner.invoke(app, ["calibrate", "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["recommended_sink_dims"]) == 2
    assert set(data["per_layer"]) == {"2", "3"}
