"""The README's two commands are the ones CI runs, and its main job works as written."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _readme_commands():
    blocks = _bash_blocks((REPO / "README.md").read_text())
    setup, tests = blocks[0], blocks[1]
    return setup.split(" && "), tests


def test_ci_runs_the_readme_commands():
    setup_steps, test_command = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text().replace("pip install -q", "pip install")  # CI may quieten pip
    install = [s for s in setup_steps if s.startswith("pip install")]
    assert install, "README set-up has no pip install step"
    ci_install = " && ".join("python -m " + s for s in install)
    assert ci_install in ci, f".ci/run must install exactly as the README does: {ci_install}"
    assert test_command.startswith("python -m pytest -q")
    assert test_command in ci


def test_readme_main_job_runs(tmp_path):
    """Run the README's main job (everything after the install) with the output folder moved into tmp."""
    setup_steps, _ = _readme_commands()
    main_job = [s for s in setup_steps if s.startswith("invdiff ")]
    assert len(main_job) == 1, setup_steps
    argv = shlex.split(main_job[0])
    out_index = argv.index("--out") + 1
    argv[out_index] = str(tmp_path / Path(argv[out_index]).name)
    result = subprocess.run([sys.executable, "-m", "invdiff.cli", *argv[1:], "--no-progress"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(argv[out_index]).exists()
    assert "PSNR" in result.stdout


def test_readme_tour_runs(monkeypatch):
    """The Python tour runs as written (from the repository root, where its sample paths point)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python tour"
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md tour", "exec"), namespace)
    assert namespace["result"].x.shape == (1, 2, 320, 320)
    assert namespace["solution"].image.shape == (192, 192)
