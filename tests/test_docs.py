"""The documentation: links resolve, every command shown parses with the CLI's own parsers, measured
tables equal what tools/render_docs.py renders from docs/results/, help texts end with an example."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from converters.cli import parser as convert_parser
from ernie_paddle.cli import _parser as cli_parser
from ernie_paddle.cli import version

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {"&&", "||", "|", ";", "&"}


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_lines(text: str) -> list[str]:
    """Shell lines of fenced blocks (not Python ones) and of indented blocks, continuations joined."""
    lines = []
    for language, body in FENCE.findall(text):
        if language not in ("python", "json", "yaml", "text"):
            lines += body.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", text)
    lines += [line[4:] for line in prose.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    return [line.strip() for line in lines if line.strip()]


def commands(line: str) -> list[list[str]]:
    """The ernie-paddle / convert commands of one shell line, as argv lists with the program first."""
    words = shlex.split(line, comments=True)
    found, current = [], []
    for word in words + [";"]:
        if word in SEPARATORS:
            while current and re.fullmatch(r"\w+=.*", current[0]):  # VAR=value prefixes
                current.pop(0)
            if current[:3] in (["python", "-m", "ernie_paddle"], ["python", "-m", "converters"]):
                current = ["ernie-paddle" if current[2] == "ernie_paddle" else "convert"] + current[3:]
            if current and current[0] in ("ernie-paddle", "convert"):
                found.append(current)
            current = []
        else:
            current.append(word)
    return found


def parse_error(argv: list[str]) -> str | None:
    """None if the CLI's own parser accepts argv, else its error. Only parses: nothing runs."""
    program, args = argv[0], argv[1:]
    if program == "ernie-paddle" and args[:1] == ["convert"]:
        program, args = "convert", args[1:]
    parser = convert_parser("convert") if program == "convert" else cli_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        return None if e.code == 0 else stderr.getvalue().strip().splitlines()[-1]
    return None


def shown_commands() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(ROOT)}: {line}", line) for page in PAGES
            for line in code_lines(page.read_text(encoding="utf-8")) if commands(line)]


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_shown_command_parses():
    shown = shown_commands()
    assert len(shown) > 20, "the command extraction found too little: is the Markdown still parsed?"
    failures = []
    for where, line in shown:
        for argv in commands(line):
            error = parse_error(argv)
            if error is not None:
                failures.append(f"{where}\n    -> {error}")
    assert not failures, "\n".join(failures)


def test_the_command_check_can_fail():
    assert parse_error(["ernie-paddle", "generate", "--model", "M", "--prompt", "x", "--no-such-option"])
    assert parse_error(["ernie-paddle", "no-such-command"])
    assert parse_error(["ernie-paddle", "convert", "pt2paddle", "only-src"])
    assert parse_error(["ernie-paddle", "bench", "--model", "M", "--batch", "two"])
    assert commands("X=1 python -m ernie_paddle demo && convert verify a b  # note") == [
        ["ernie-paddle", "demo"], ["convert", "verify", "a", "b"]]


def test_scripts_named_in_commands_exist():
    missing = [f"{page.relative_to(ROOT)}: {script}" for page in PAGES
               for line in code_lines(page.read_text(encoding="utf-8"))
               for script in re.findall(r"\bpython3? (tools/\S+\.py)", line) if not (ROOT / script).exists()]
    assert not missing, missing


def test_rendered_tables_match_the_results_files():
    render = load_renderer()
    stale = [str(page.relative_to(ROOT)) for page in PAGES
             if render.render(page.read_text(encoding="utf-8"), page) != page.read_text(encoding="utf-8")]
    assert not stale, f"out of date: {stale}; run python tools/render_docs.py"
    regions = [m["name"] for page in PAGES for m in render.REGION.finditer(page.read_text(encoding="utf-8"))]
    for path in (ROOT / "docs" / "results").glob("*.json"):
        assert path.stem in regions, f"{path.name} is shown nowhere"
        results = json.loads(path.read_text(encoding="utf-8"))
        assert {"command", "date", "machine", "versions", "data"} <= results.keys()


def test_a_changed_figure_is_caught(tmp_path, monkeypatch):
    render = load_renderer()
    page = ROOT / "docs" / "checking.md"
    text = page.read_text(encoding="utf-8")
    assert "<!-- results:check-demo-transformers -->" in text
    results = json.loads((ROOT / "docs" / "results" / "check-demo-transformers.json").read_text(encoding="utf-8"))
    results["data"]["summary"]["all_positions"]["max_abs_dp"] *= 10
    (tmp_path / "check-demo-transformers.json").write_text(json.dumps(results), encoding="utf-8")
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    assert render.render(text, page) != text


def test_bench_json_is_recorded_and_rendered(tmp_path, monkeypatch):
    """`ernie-paddle bench --json` on the demo model, through `record` and `render`."""
    from ernie_paddle.demo import DEMO_MODEL

    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "ernie_paddle", "bench", "--model", str(DEMO_MODEL), "--device", "cpu",
                          "--input-lens", "3", "--output-lens", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    render = load_renderer()
    monkeypatch.setattr(render, "RESULTS", tmp_path / "results")
    render.record("bench-demo", out, "ernie-paddle bench --model DEMO")
    page = tmp_path / "page.md"
    text = render.render("<!-- results:bench-demo -->\n<!-- /results -->\n", page)
    assert "| 3 | 4 | 1 |" in text and "ernie-4.5-tiny-demo-PT on cpu" in text
    assert "Command: `ernie-paddle bench --model DEMO`" in text and "[bench-demo.json](results/bench-demo.json)" in text
    bad = tmp_path / "other.json"
    bad.write_text('{"something": 1}')
    with pytest.raises(ValueError, match="unknown results JSON"):
        render.record("other", bad, "x")


def help_texts():
    top = cli_parser()
    sub = next(a for a in top._actions if a.choices and "generate" in a.choices).choices
    converter = convert_parser("ernie-paddle convert")
    converter_sub = next(a for a in converter._actions if a.choices and "verify" in a.choices).choices
    yield "ernie-paddle", top.format_help()
    for name, p in sub.items():
        if name != "convert":  # `ernie-paddle convert --help` is the converter's own help
            yield f"ernie-paddle {name}", p.format_help()
    yield "ernie-paddle convert", converter.format_help()
    for name, p in converter_sub.items():
        yield f"ernie-paddle convert {name}", p.format_help()


HELPS = list(help_texts())


@pytest.mark.parametrize("name,text", HELPS, ids=[name for name, _ in HELPS])
def test_help_ends_with_an_example_that_parses(name, text):
    lines = text.rstrip().splitlines()
    example = lines[-1].strip()
    assert any(line.startswith("example") for line in lines[-4:]), f"{name} --help has no example at its end"
    assert example.startswith(name), example
    assert parse_error(shlex.split(example)) is None, example


def test_help_shows_the_defaults_and_generate_s_are_the_api_s():
    import inspect
    from ernie_paddle.predictor import ErniePredictor

    generate = dict(HELPS)["ernie-paddle generate"]
    api = inspect.signature(ErniePredictor.generate).parameters
    for option, parameter in [("--max-new-tokens", "max_new_tokens"), ("--temperature", "temperature"),
                              ("--top-p", "top_p"), ("--top-k", "top_k"), ("--repetition-penalty", "repetition_penalty")]:
        entry = generate.split(f"\n  {option} ", 1)[1].split("\n  -", 1)[0]  # the option's lines of help
        shown = re.search(r"\(default: ([^)]+)\)", " ".join(entry.split()))
        assert shown and float(shown[1]) == api[parameter].default, (option, generate)
    assert "(default: 8)" in " ".join(dict(HELPS)["ernie-paddle serve"].split())  # --max-num-seqs


def test_help_and_version_from_the_command_line():
    run = subprocess.run([sys.executable, "-m", "ernie_paddle", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"ernie-paddle {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())
    run = subprocess.run([sys.executable, "-m", "ernie_paddle", "check", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.rstrip().splitlines()[-1].strip().startswith("ernie-paddle check ")


def test_readme_keeps_the_ci_command_and_stays_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "    pip install -e '.[cpu]' && ernie-paddle demo\n" in readme
    assert "    pip install -e '.[cpu,test]' && python -m pytest -q\n" in readme
    assert "pip install -q -e '.[cpu,test]' && python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert len(readme.splitlines()) <= 160


@pytest.mark.parametrize("tool", sorted((ROOT / "tools").glob("*.py")), ids=lambda p: p.name)
def test_each_tool_s_help_describes_it_in_whole_sentences(tool):
    run = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    description = " ".join(run.stdout.split("\n\n")[1].split())  # after the usage lines
    assert description.endswith((".", ":", ")")), description
