from kdpipe.config import parse_params


def test_default_params_file_is_valid():
    import yaml

    from tests.conftest import PROJECT_ROOT

    params = parse_params(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()))
    assert params.data.name == "digits"
