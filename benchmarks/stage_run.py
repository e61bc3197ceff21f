"""Running a pipeline stage from a benchmark: its output captured, its error shown if it fails.

Imported by the benchmark scripts beside it (a script's own folder is on sys.path)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project root, for every benchmark beside this one


def stage_script(name: str) -> str:
    """The path of stages/<name>.py."""
    return str(ROOT / "stages" / f"{name}.py")


def stage(name: str, *args) -> list[str]:
    """The command line that runs stages/<name>.py with args in this Python."""
    return [sys.executable, stage_script(name), *map(str, args)]


def run_quiet(cmd: list[str], d: Path, env: dict) -> None:
    """Run cmd (a stage script, perhaps behind a launcher) in folder d, its output captured; if
    it fails, stop with d's name, the script, d/params.yaml and the stage's last error lines
    (e.g. an unknown key in d/params.yaml), not a bare exit status."""
    proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
    if proc.returncode:
        script = next(Path(a).name for a in cmd if str(a).endswith(".py"))
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SystemExit(f"{d.name}: {script} failed (exit {proc.returncode}) with {d / 'params.yaml'}:\n{tail}")
