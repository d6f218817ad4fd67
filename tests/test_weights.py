"""The model cache admins fill for jobs without network (gateway/core/weights.py)."""
import pytest


def test_weights_land_where_torch_looks_readable_by_everyone(local_app, tmp_path):
    local_app.config["MODELS_DIR"] = str(tmp_path / "models")
    source = tmp_path / "resnet18.pth"
    source.write_bytes(b"weights")
    runner = local_app.test_cli_runner()
    result = runner.invoke(args=["weights", "add", str(source), "--as", "torch/hub/checkpoints/resnet18-f37072fd.pth"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "models" / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert target.read_bytes() == b"weights" and target.stat().st_mode & 0o777 == 0o644
    assert all((tmp_path / "models" / p).stat().st_mode & 0o777 == 0o755
               for p in ("", "torch", "torch/hub", "torch/hub/checkpoints"))
    listed = runner.invoke(args=["weights", "list"]).output
    assert "torch/hub/checkpoints/resnet18-f37072fd.pth" in listed


@pytest.mark.parametrize("name", ["../outside.pth", "/etc/cron.d/x", "torch/../../x", ""])
def test_a_name_outside_the_cache_is_refused(local_app, tmp_path, name):
    local_app.config["MODELS_DIR"] = str(tmp_path / "models")
    source = tmp_path / "w.pth"
    source.write_bytes(b"w")
    result = local_app.test_cli_runner().invoke(args=["weights", "add", str(source), "--as", name])
    assert result.exit_code != 0 and "inside the cache" in result.output
    assert not (tmp_path / "outside.pth").exists()


def test_without_a_cache_folder_the_command_names_the_setting(local_app, tmp_path):
    local_app.config["MODELS_DIR"] = None  # the testbed's gateway.env sets one
    source = tmp_path / "w.pth"
    source.write_bytes(b"w")
    result = local_app.test_cli_runner().invoke(args=["weights", "add", str(source), "--as", "torch/w.pth"])
    assert result.exit_code != 0 and "M2D_MODELS_DIR" in str(result.exception or result.output)
