"""The interactive CLI: several turns on one image, then quit on an empty line."""

import argparse

from PIL import Image

from llava.serve.cli import chat


def test_two_turns_then_quit(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "img.png"
    Image.new("RGB", (800, 500), (10, 200, 30)).save(path)
    turns = iter(["What is it?", "And the colour?", ""])
    args = argparse.Namespace(model_path=tiny_checkpoint, image_file=[str(path)], conv_mode=None,
                              temperature=0.0, max_new_tokens=3, device="cpu", dtype=None,
                              retention_ratio=1.0, token_layout=None)
    chat(args, read=lambda prompt: next(turns))
    lines = capsys.readouterr().out.splitlines()
    summaries = [line for line in lines if line.startswith("[summary]")]
    assert len(summaries) == 2 and all("visual tokens 2046" in line for line in summaries)
    # The second turn's prompt holds the first exchange, so it is longer.
    prompt_tokens = [int(line.split("prompt tokens ")[1].split(" ")[0]) for line in summaries]
    assert prompt_tokens[1] > prompt_tokens[0]
    assert lines[-1] == "exit..."
