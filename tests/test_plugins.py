"""The plugin mechanism end to end: the template becomes a working operator, shipped plugins register, and
the Gaussian-blur plugin's two boundary models are exact transposes of what they claim to compute."""
import ast
import sys

import pytest
import torch
import torch.nn.functional as F

import invdiff
from invdiff import registry

F64 = torch.float64
PUBLIC_API = {"invdiff.operators.base": {"Operator"}, "invdiff.registry": {"register_operator"}}


def _randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _adjoint_error(op, dtype=F64):
    """|<A x, y> - <x, A^T y>| / (|A x| |y|)."""
    x = _randn((2, *op.in_shape), 0, dtype)
    Ax = op.A(x)
    y = _randn(Ax.shape, 1, dtype)
    return float(((Ax * y).sum() - (x * op.A_adjoint(y)).sum()).abs() / (Ax.norm() * y.norm()))


def _invdiff_imports(path):
    """(module, name) for every ``from invdiff... import name`` and ``import invdiff...`` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("invdiff"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("invdiff")]
    return found


def test_template_copy_with_a_new_name_is_a_working_operator(tmp_path, repo):
    """Step 1-2 of the template (copy, rename the registered name) give an operator that registers and
    passes the adjoint check <A x, y> = <x, A^T y> and A A^+ A x = A x."""
    text = (repo / "operators" / "_template.py").read_text()
    assert '@register_operator("my_operator"' in text, "the template registers the placeholder name"
    (tmp_path / "template_probe.py").write_text(text.replace('"my_operator"', '"template_probe"'))
    try:
        loaded = invdiff.load_plugins(tmp_path, entry_points=False)
        assert "invdiff_plugins.template_probe" in loaded
        assert "template_probe" in invdiff.list_operators()
        op = invdiff.example_operator("template_probe").to(F64)
        assert _adjoint_error(op) < 1e-12
        y = op.A(_randn((2, *op.in_shape), 2))
        assert torch.allclose(op.A(op.A_dagger(y)), y, atol=1e-12)
        changed = op.replace(channels=3)
        assert changed.in_shape[0] == 3 and op.in_shape[0] == 2
    finally:
        registry._OPERATORS.pop("template_probe", None)
        sys.modules.pop("invdiff_plugins.template_probe", None)


def test_template_itself_is_not_loaded():
    """Files starting with '_' are skipped, so the placeholder name never reaches the registry."""
    assert "my_operator" not in invdiff.list_operators()


@pytest.mark.parametrize("name", ["gaussian_blur", "limited_angle_ct"])
def test_shipped_plugins_are_registered(name, repo):
    if not (repo / "operators" / f"{name}.py").exists():
        pytest.skip(f"operators/{name}.py is not in this checkout")
    assert name in invdiff.list_operators()
    assert _adjoint_error(invdiff.example_operator(name).to(F64)) < 1e-12


@pytest.mark.parametrize("filename", ["gaussian_blur.py", "_template.py"])
def test_example_plugins_use_only_the_public_api(filename, repo):
    for module, name in _invdiff_imports(repo / "operators" / filename):
        assert name in PUBLIC_API.get(module, set()), f"{filename} imports {module}.{name}"


# ---- the Gaussian-blur plugin ----------------------------------------------------------------------------

def _blur(**kwargs):
    return invdiff.operator("gaussian_blur", **kwargs).to(F64)


def _reference_blur(x, taps, mode):
    """Pad by k//2 with ``mode``, then a 'valid' 2-D convolution with the separable kernel g g^T."""
    pad = len(taps) // 2
    kernel = (taps[:, None] * taps[None, :]).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), kernel, groups=x.shape[1])


@pytest.mark.parametrize("padding", ["circular", "reflect"])
def test_blur_matches_pad_then_convolve(padding):
    op = _blur(img_size=(12, 15), sigma=1.2, padding=padding, channels=2)
    x = _randn((2, 2, 12, 15), 3)
    assert torch.allclose(op.A(x), _reference_blur(x, op.taps, padding), atol=1e-14)


@pytest.mark.parametrize("padding", ["circular", "reflect"])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (F64, 1e-12)])
def test_blur_adjoint_is_exact_for_both_paddings(padding, dtype, bound):
    op = _blur(img_size=(16, 15), sigma=2.0, padding=padding, channels=2).to(dtype)
    assert _adjoint_error(op, dtype) < bound


def test_reflect_blur_is_flagged_not_normalised_because_its_norm_exceeds_one():
    """Reflect padding counts border pixels twice: ||A||_2 > 1 (largest singular value of the dense
    matrix, columns A e_j), so normalized is False."""
    op = _blur(img_size=(12, 12), sigma=1.5, padding="reflect")
    matrix = op.A(torch.eye(144, dtype=F64).reshape(144, 1, 12, 12)).reshape(144, 144).T
    assert torch.linalg.eigvalsh(matrix.T @ matrix).max().sqrt() > 1.001 and not op.normalized and not op.has_exact_pinv
    assert _blur(img_size=16, sigma=1.5).normalized


def test_circular_pinv_inverts_kept_frequencies_and_drops_the_rest():
    """A^+ = F^H diag(1/g_hat) F on |g_hat| > rcond max|g_hat|: A A^+ y = y for y = A x, and with a huge
    rcond only the zero frequency survives, so A^+ y is the mean of y."""
    op = _blur(img_size=(16, 12), sigma=1.0, channels=1)
    y = op.A(_randn((2, 1, 16, 12), 5))
    assert torch.allclose(op.A(op.A_dagger(y)), y, atol=1e-10)
    only_dc = op.replace(rcond=0.999)
    assert torch.allclose(only_dc.A_dagger(y), y.mean(dim=(-2, -1), keepdim=True).expand_as(y), atol=1e-12)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(img_size=16, sigma=0.0), "sigma"),
    (dict(img_size=16, sigma=1.0, kernel_size=4), "kernel_size"),
    (dict(img_size=8, sigma=1.0, kernel_size=9), "kernel_size"),
    (dict(img_size=16, sigma=1.0, padding="zeros"), "padding"),
    (dict(img_size=(16,), sigma=1.0), "img_size"),
    (dict(img_size=16, sigma=1.0, channels=0), "channels"),
])
def test_blur_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        invdiff.operator("gaussian_blur", **kwargs)
