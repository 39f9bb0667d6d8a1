import textwrap

import pytest
import torch

import invdiff
from invdiff import registry
from invdiff.operators.base import Operator


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="registered:"):
        invdiff.operator("no-such-operator")


def test_plugin_folder_is_loaded(tmp_path):
    (tmp_path / "scale_by_three.py").write_text(textwrap.dedent('''
        import torch
        from invdiff.operators.base import Operator
        from invdiff.registry import register_operator

        @register_operator("scratch_scale3", example=lambda: ScaleByThree(size=4))
        class ScaleByThree(Operator):
            def __init__(self, size=4):
                super().__init__()
                self.size = size
            @property
            def in_shape(self):
                return (1, self.size, self.size)
            def A(self, x, **kwargs):
                return 3 * x
            def A_adjoint(self, y, **kwargs):
                return 3 * y
    '''))
    (tmp_path / "_ignored.py").write_text("raise RuntimeError('files starting with _ are templates')")
    loaded = invdiff.load_plugins(tmp_path, entry_points=False)
    try:
        assert loaded == ["invdiff_plugins.scale_by_three"]
        op = invdiff.operator("scratch_scale3", size=5)
        assert op.in_shape == (1, 5, 5)
        assert torch.equal(op.A(torch.ones(1, 1, 5, 5)), torch.full((1, 1, 5, 5), 3.0))
    finally:
        registry._OPERATORS.pop("scratch_scale3", None)


def test_broken_plugin_fails_loudly(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ImportError, match="broken.py"):
        invdiff.load_plugins(tmp_path, entry_points=False)


def test_missing_plugin_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        invdiff.load_plugins(tmp_path / "nope", entry_points=False)


def test_name_clash_is_refused():
    class First(Operator):
        pass

    class Second(Operator):
        pass

    registry.register_operator("clash_probe")(First)
    try:
        with pytest.raises(ValueError, match="already registered"):
            registry.register_operator("clash_probe")(Second)
    finally:
        registry._OPERATORS.pop("clash_probe", None)


def test_replace_records_arguments_and_rejects_unknown():
    class Scale(Operator):
        def __init__(self, factor=2.0, *, size=3):
            super().__init__()
            self.factor, self.size = factor, size

    op = Scale(5.0, size=4)
    new = op.replace(factor=1.0)
    assert (new.factor, new.size) == (1.0, 4) and op.factor == 5.0
    with pytest.raises(TypeError, match="unknown argument"):
        op.replace(bogus=1)
