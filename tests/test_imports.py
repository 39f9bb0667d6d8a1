"""`import invdiff` and `invdiff --help` stay light: no torch, no deepinv, no solver until one is used.

deepinv alone takes 3.5 to 10 s to import on these machines; a user asking for --help should not wait for it.
"""
import resource
import subprocess
import sys


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_import_invdiff_imports_no_heavy_module():
    code = ("import sys, invdiff; heavy = [m for m in ('torch', 'deepinv', 'numpy', 'invdiff.samplers', "
            "'invdiff.operators', 'invdiff.priors') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_answers_in_under_a_second_of_cpu():
    before = _child_cpu_seconds()
    result = subprocess.run([sys.executable, "-m", "invdiff.cli", "--help"], capture_output=True, text=True)
    cpu = _child_cpu_seconds() - before
    assert result.returncode == 0 and "reconstruct" in result.stdout
    assert cpu < 1.0, f"invdiff --help used {cpu:.2f} s of CPU"
    for command in ("reconstruct", "compare", "list", "sample-prior"):
        result = subprocess.run([sys.executable, "-m", "invdiff.cli", command, "--help"], capture_output=True,
                                text=True)
        assert result.returncode == 0 and "usage" in result.stdout


def test_public_names_still_resolve_lazily():
    import invdiff
    assert invdiff.InverseProblem.__name__ == "InverseProblem"
    assert callable(invdiff.simulate) and callable(invdiff.tasks.scan_slice)
    assert invdiff.settings.effective("dps", "mri")["zeta"] == 3.0
    assert invdiff.list_solvers() == invdiff.list_samplers()
