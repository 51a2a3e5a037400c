"""The interactive CLI: several turns on one image, then quit on an empty line."""

from PIL import Image

from llava.serve.cli import build_parser, chat


def test_two_turns_then_quit(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "img.png"
    Image.new("RGB", (800, 500), (10, 200, 30)).save(path)
    turns = iter(["What is it?", "And the colour?", ""])
    args = build_parser().parse_args(["--model-path", tiny_checkpoint, "--image-file", str(path), "--max-new-tokens", "3",
                                      "--device", "cpu", "--retention-ratio", "1"])
    chat(args, read=lambda prompt: next(turns))
    lines = capsys.readouterr().out.splitlines()
    summaries = [line for line in lines if line.startswith("[summary]")]
    assert len(summaries) == 2 and all("visual tokens 2046" in line for line in summaries)
    # The second turn's prompt holds the first exchange, so it is longer.
    prompt_tokens = [int(line.split("prompt tokens ")[1].split(" ")[0]) for line in summaries]
    assert prompt_tokens[1] > prompt_tokens[0]
    assert lines[-1] == "exit..."


def test_compression_lines_each_turn(tiny_checkpoint, tmp_path, capsys):
    """The README promises the [compression] line per image, as run_llava prints it."""
    path = tmp_path / "img.png"
    Image.new("RGB", (800, 500), (10, 200, 30)).save(path)
    turns = iter(["What is it?", "And the colour?", ""])
    args = build_parser().parse_args(["--model-path", tiny_checkpoint, "--image-file", str(path), "--max-new-tokens", "2",
                                      "--device", "cpu", "--retention-ratio", "0.25"])
    chat(args, read=lambda prompt: next(turns))
    lines = capsys.readouterr().out.splitlines()
    compression = [line for line in lines if line.startswith("[compression] image 1:")]
    assert len(compression) == 2 and all("/2046 tokens | thumbnail 144 |" in line for line in compression)
