"""`tools/make_sample_images.py` writes where it is told, and `--help` writes nothing."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_sample_images.py"
NAMES = ["shapes-500x900.png", "shapes-800x500.png"]


def _modified(folder: pathlib.Path) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in [folder, *folder.iterdir()]}


def test_help_writes_nothing(tmp_path):
    before = _modified(REPO / "images")
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--out" in result.stdout
    assert "wrote" not in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert _modified(REPO / "images") == before


def test_out_gets_the_two_images(tmp_path):
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, str(TOOL), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == NAMES
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in NAMES)
    assert list(tmp_path.iterdir()) == [out]
