from localvl.models.demo import DEMO_FAMILY, demo_model_path


def test_demo_model_is_built_once_and_reused(tmp_path):
    first = demo_model_path(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = demo_model_path(tmp_path)
    assert again == first
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert DEMO_FAMILY in first.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-")]  # no staging left behind
