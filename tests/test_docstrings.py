"""The worked examples in the modules' docstrings run and give what they show."""
import doctest
import importlib

import pytest

MODULES = ["comfyui_xdit_hunyuan.parallel.mesh", "comfyui_xdit_hunyuan.parallel.layout", "comfyui_xdit_hunyuan.plan",
           "comfyui_xdit_hunyuan.config", "comfyui_xdit_hunyuan.job", "comfyui_xdit_hunyuan.compile_cache",
           "comfyui_xdit_hunyuan.worker.weights", "comfyui_xdit_hunyuan.parallel.steps"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
