"""The Colab notebook, run headless on CPU: a run stopped early (a disconnect), a re-run that resumes and finishes."""

from __future__ import annotations

import json
import os
import shlex
import sys

import nbformat
import pytest
from conftest import REPO, TINY_LM, checkpoint_steps
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "notebooks" / "colab_t4.ipynb"
KERNEL = "resumable-test-venv"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter: JUPYTER_PATH comes first, so no other `python3` spec can win."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # keep the user's ~/.ipython out of it
    return KERNEL


def execute(kernel: str, env: dict[str, str]) -> dict[str, str]:
    """Run the notebook top to bottom as a user would; return each code cell's text output by cell id."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **env})
    texts = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            texts[cell.id] = "".join(
                o.text if o.output_type == "stream" else "".join(f"<{mime}>" for mime in o.get("data", {}))
                for o in cell.outputs
            )
    return texts


def assert_all_checkpoints_valid(verify_output: str, steps: list[int]) -> None:
    rows = [line.split() for line in verify_output.splitlines() if line.startswith("step-")]
    assert [int(r[1]) for r in rows] == steps, verify_output
    assert all(r[3:] == ["valid"] for r in rows), verify_output
    assert f"{len(steps)} checkpoint(s): all valid" in verify_output


def test_notebook_stops_early_then_resumes_on_rerun(tmp_path, cache_dir, venv_kernel):
    out = tmp_path / "run"
    tiny = [*TINY_LM, "--cache_dir", str(cache_dir)]
    env = {"RESUMABLE_CONFIG": "configs/tiny_lm.yaml", "RESUMABLE_OUTPUT_DIR": str(out)}

    # First session: stops after 6 steps with a checkpoint, like a Colab VM that goes away.
    first = execute(venv_kernel, {**env, "RESUMABLE_ARGS": shlex.join([*tiny, "--max_steps_per_run", "6"])})
    assert f"python: {sys.executable}" in first["setup"], "the kernel must run the venv's interpreter"
    assert f"repository: {REPO}" in first["setup"]
    assert f"output dir: {out}" in first["drive"] and "not on Colab" in first["drive"]
    train = first["train"]
    assert "accelerate_configs/cpu.yaml" in train and "--max_steps_per_run 6" in train
    assert "requeue at step 6" in train and "exit 75: stopped with a checkpoint" in train, train[-3000:]
    assert "Resuming from" not in train
    assert not (out / "COMPLETE").exists()
    assert json.loads((out / "run_status.json").read_text())["exit_code"] == 75
    steps = checkpoint_steps(out)
    assert steps[-1] == 6, steps
    assert_all_checkpoints_valid(first["verify"], steps)
    assert "Not finished yet" in first["results"] and "<image/png>" not in first["results"]

    # Second session, same notebook: resumes from the newest checkpoint and finishes (3 epochs of 9 steps).
    second = execute(venv_kernel, {**env, "RESUMABLE_ARGS": shlex.join(tiny)})
    train = second["train"]
    assert "Resuming from" in train and "step-00000006: step 6" in train, train[-3000:]
    assert "exit 0: finished" in train
    assert (out / "COMPLETE").exists()
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"
    steps = checkpoint_steps(out)
    assert steps[-1] == 27, steps
    assert_all_checkpoints_valid(second["verify"], steps)
    assert '"step": 27' in second["results"] and "<image/png>" in second["results"]  # metrics and loss curve


def test_the_notebook_names_the_one_line_to_edit_and_clones_no_placeholder():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(cell.source for cell in nb.cells)
    assert "YOUR-USER" not in text and "Nothing to edit." not in text
    assert "Set `REPO_URL`" in nb.cells[0].source
    setup = next(cell.source for cell in nb.cells if cell.get("id") == "setup")
    assert setup.index("if not REPO_URL:") < setup.index('"git", "clone"')
