"""The registry of data sources (kdpipe.data.sources): one module per source, each in the file
dvc.yaml depends on; unknown names refused with the list of registered ones; image sizes."""

from __future__ import annotations

import pytest
import yaml

from kdpipe.config import parse_params
from kdpipe.data.sources import SOURCES, Source, image_size
from kdpipe.errors import ConfigError
from tests.conftest import PROJECT_ROOT

DVC_DEP = "src/kdpipe/data/sources/${data.name}.py"


def test_every_source_lives_in_its_own_module_file():
    # the path the download and prepare stages depend on, so editing one source re-runs only its data
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("download", "prepare"):
        assert DVC_DEP in stages[stage]["deps"], stage
    assert set(SOURCES.names()) == {"digits", "cifar10", "intel", "cats_vs_dogs", "imagefolder", "csv"}
    for plugin in SOURCES:
        assert plugin.module == f"kdpipe.data.sources.{plugin.name}"
        assert plugin.file == f"src/kdpipe/data/sources/{plugin.name}.py"
        assert plugin.file == DVC_DEP.replace("${data.name}", plugin.name)
        assert (PROJECT_ROOT / plugin.file).is_file(), plugin.file
        assert isinstance(plugin.factory, Source)


def test_unknown_source_is_a_config_error_listing_the_registered_names():
    expected = "params.yaml: data.name='mnist' is not allowed; expected one of " + ", ".join(SOURCES.names()) + "."
    with pytest.raises(ConfigError) as err:
        SOURCES.get("mnist")
    assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:
        parse_params({"data": {"name": "mnist"}})  # what a stage reports for params.yaml
    assert str(err.value) == expected
    for name in ("digits", "cifar10", "intel", "cats_vs_dogs"):
        assert name in str(err.value)


def test_exp_run_with_only_the_name_stays_meaningful():
    """`dvc exp run -S data.name=cifar10` on the default params: the data set's own size."""
    params = parse_params(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()))
    sizes = {}
    for name in SOURCES.names():
        sizes[name] = image_size(params.data, SOURCES.get(name).factory)
    assert sizes == {"digits": 8, "cifar10": 32, "intel": 64, "cats_vs_dogs": 64, "imagefolder": 64, "csv": 64}
    assert params.data.augment.flip  # flipped where the source allows it (not digits)
    sized = parse_params({"data": {"image_size": 20}})  # a size in params.yaml wins
    assert {image_size(sized.data, plugin.factory) for plugin in SOURCES} == {20}
