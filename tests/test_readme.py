"""Every Python example in README.md runs, in order, with a tiny model in place of the bundled SmolLM2."""
import re
from pathlib import Path


from conftest import make_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and all('load_model("smollm2-135m")' not in b for b in blocks[1:])
    assert 'load_model("smollm2-135m")' in blocks[0]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    model = make_tiny_model(tmp_path / "tiny", "llama", max_position_embeddings=4096)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():
        code = block.replace('load_model("smollm2-135m")', f"load_model({str(model)!r})")
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "artifacts" / "macbeth-chat.h5").is_file()
    assert len(namespace["answers"]) == 2 and namespace["beams"].shape[0] == 4
