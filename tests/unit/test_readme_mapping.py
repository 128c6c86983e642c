"""The documentation's commands, mapped (tests/support/readme_commands.py): every one maps, its options
parse with the real parser, and each placeholder rule does what its docstring says. Running them is
tests/jobs/test_readme_commands.py; this is the fast part of the same promise."""
import ast
import re
import textwrap

import pytest

import readme_commands as R


def _plans(tmp_path, text):
    """The plans of a README with ``text``; the first mapping error is raised."""
    (tmp_path / "README.md").write_text(textwrap.dedent(text))
    plans = R.plans(tmp_path)
    for p in plans:
        if p.error:
            raise R.MappingError(p.error)
    return plans


def _runs(plan):
    return [" ".join(s.argv) for s in plan.runs]


# --------------------------------------------------------------------------- the repository's documents


def test_every_documented_command_maps():
    plans = R.plans()
    errors = [p.error for p in plans if p.error]
    assert not errors, "\n".join(errors)  # each names the table to extend
    runs = [s for p in plans for s in p.runs]
    assert {s.subcommand for s in runs} >= {"matte", "encode", "convert", "train", "eval"}
    assert any(s.launcher == "torchrun" for s in runs) and any(s.launcher == "launcher" for s in runs)
    assert any(p.python for p in plans)
    docs = {p.id.split(":")[0] for p in plans}
    assert "README.md" in docs and any(d.startswith("web/docs/") for d in docs)


def _benchmark_options(script: str):
    tree = ast.parse((R.ROOT / script).read_text())
    return {a.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
            for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}


def _parse(step: R.Step):
    if step.program == "iconmatting_core":
        from iconmatting_core.__main__ import build_parser

        return build_parser().parse_args(step.args)
    if step.program == "eval":
        from iconmatting_core.eval.cli import _parser

        return _parser().parse_args(step.args)
    unknown = {a for a in step.args if a.startswith("--")} - _benchmark_options(step.script)
    assert not unknown, f"{step.ref}: {step.script} defines no {sorted(unknown)}"
    return None


@pytest.mark.parametrize("step", [s for _, s in R.iter_commands()], ids=lambda s: f"{s.ref}:{' '.join(s.args[:1])}")
def test_every_documented_command_parses(step, capsys):
    """Run or not (a benchmark, the Ray cluster line), each command's options are the program's own."""
    try:
        _parse(step)
    except SystemExit:
        pytest.fail(f"{step.ref}: `{step.text}` is refused by its parser: {capsys.readouterr().err.strip()}")


def test_no_stale_reason_to_skip():
    texts = [s.text for p in R.plans() for s in p.steps]
    for rx, reason, _ in R.NOT_RUN:
        assert any(re.match(rx, t) for t in texts), f"NOT_RUN rule {rx!r} matches no documented line; drop it"
    scripts = {s.script for p in R.plans() for s in p.steps}
    assert set(R.SCRIPTS_NOT_RUN) <= scripts, set(R.SCRIPTS_NOT_RUN) - scripts


# --------------------------------------------------------------------------- the rules, on documents written here


def test_lines_are_joined_and_comments_dropped(tmp_path):
    [plan] = _plans(tmp_path, """
        ```bash
        # make the context
        python -m iconmatting_core encode --reference ref.jpg \\
            --mask ref_mask.png --out ctx.safetensors   # once
        ```
        """)
    [step] = plan.runs
    assert step.argv == ["python", "-m", "iconmatting_core", "encode", "--reference", "ref.jpg", "--mask",
                         "ref_mask.png", "--out", "ctx.safetensors"]
    assert step.ref == "README.md:4" and step.inputs == {"ref.jpg": "reference_jpg", "ref_mask.png": "reference_mask"}
    assert step.outputs == {"--out": "ctx.safetensors"}


def test_one_unmapped_block_leaves_the_others_runnable(tmp_path):
    encode = "python -m iconmatting_core encode --reference ref.jpg --mask ref_mask.png --out c.safetensors"
    (tmp_path / "README.md").write_text(f"```bash\nffmpeg -i clip.mp4 x.png\n```\n\n```bash\n{encode}\n```\n")
    first, second = R.plans(tmp_path)
    assert "ffmpeg" in first.error and not first.steps
    assert not second.error and len(second.runs) == 1


def test_an_unknown_input_path_says_what_to_add(tmp_path):
    with pytest.raises(R.MappingError, match=r"README.md:3: input path 'shots/' .* not in INPUTS"):
        _plans(tmp_path, """
            ```bash
            python -m iconmatting_core matte --context ref_context.safetensors --targets shots/ --out o/
            ```
            """)


def test_an_unknown_line_says_what_to_add(tmp_path):
    with pytest.raises(R.MappingError, match=r"ffmpeg .* NOT_RUN"):
        _plans(tmp_path, "```bash\nffmpeg -i clip.mp4 first.png\n```\n")


def test_unknown_placeholders_fail(tmp_path):
    with pytest.raises(R.MappingError, match=r"unknown placeholder '...other options...'"):
        _plans(tmp_path, "```bash\npython -m iconmatting_core matte ...other options...\n```\n")
    with pytest.raises(R.MappingError, match=r"no value for --device in OPTION_VALUES"):
        _plans(tmp_path, "```bash\npython -m iconmatting_core matte --device <gpu>\n```\n")
    with pytest.raises(R.MappingError, match=r"DIRS"):
        _plans(tmp_path, "```bash\ncd somewhere\n```\n")
    with pytest.raises(R.MappingError, match=r"names no subcommand"):
        _plans(tmp_path, "```bash\npython -m iconmatting_core --targets photos/\n```\n")


def test_environment_words_and_shell_operators(tmp_path):
    [plan] = _plans(tmp_path, "```bash\nHF_HUB_OFFLINE=1 python -m iconmatting_core encode --reference ref.jpg "
                              "--mask ref_mask.png --out c.safetensors\n```\n")
    assert plan.runs[0].env == {"HF_HUB_OFFLINE": "1"} and plan.runs[0].argv[0] == "python"
    for op in ("> job.log", "2> err.log", "| tee log", "&& echo done"):
        with pytest.raises(R.MappingError, match="not shell pipelines or redirections"):
            _plans(tmp_path, f"```bash\npython -m iconmatting_core encode --out c.safetensors {op}\n```\n")


def test_optional_groups_run_with_and_without(tmp_path):
    plans = _plans(tmp_path, """
        ```bash
        python -m iconmatting_core.eval --data datasets/ICM57 [--references 1 5] [--seed 0] --per-group
        ```
        """)
    assert [p.id for p in plans] == ["README.md:3[no-optional]", "README.md:3[all-optional]"]
    assert _runs(plans[0]) == ["python -m iconmatting_core.eval --data datasets/ICM57 --per-group"]
    assert _runs(plans[1]) == ["python -m iconmatting_core.eval --data datasets/ICM57 --references 1 5 --seed 0 --per-group"]
    with pytest.raises(R.MappingError, match="never closed"):
        _plans(tmp_path, "```bash\npython -m iconmatting_core.eval --data datasets/ICM57 [--seed 0\n```\n")


def test_same_arguments_and_a_bare_ellipsis_take_earlier_arguments(tmp_path):
    plans = _plans(tmp_path, """
        ```bash
        python -m iconmatting_core train --data my_mattes/ --out runs/a --steps 5
        python -m iconmatting_core train ...same arguments... --resume latest
        ```

        ```bash
        python -m iconmatting_core matte --engine ray --context ref_context.safetensors --targets manifest.txt --out m/
        ```

        ```bash
        python -m iconmatting_core matte --engine local --threads 1 ...
        python custom_nodes/comfyui-iconmatting/iconmatting.py matte --context ... --targets ... --out ...
        ```
        """)
    assert _runs(plans[0])[1] == "python -m iconmatting_core train --data my_mattes/ --out runs/a --steps 5 --resume latest"
    # the previous matte of the document, without the options this one gives itself
    assert _runs(plans[2])[0] == ("python -m iconmatting_core matte --engine local --threads 1 --context "
                                  "ref_context.safetensors --targets manifest.txt --out m/")
    assert _runs(plans[2])[1] == ("python custom_nodes/comfyui-iconmatting/iconmatting.py matte --context "
                                  "ref_context.safetensors --targets photos/ --out mattes/")
    with pytest.raises(R.MappingError, match="no earlier `encode` command"):
        _plans(tmp_path, "```bash\npython -m iconmatting_core encode ...same arguments...\n```\n")


def test_not_run_lines_are_listed_with_their_reason(tmp_path):
    [plan] = _plans(tmp_path, """
        ```bash
        pip install -r requirements-ray.txt
        ray start --head
        python -m iconmatting_core matte --engine ray --address auto --context ref_context.safetensors --targets photos/ --out m/
        ```
        """)
    assert [s.kind for s in plan.steps] == ["skip", "skip", "skip"]
    assert "installs packages" in plan.steps[0].reason and "`ray start --head`" in plan.steps[2].reason
    assert plan.runs == []


def test_inline_commands_mentions_and_duplicates(tmp_path):
    plans = _plans(tmp_path, """
        ```bash
        python -m iconmatting_core matte --context ref_context.safetensors --targets clip.mp4 --out mattes/
        ```

        Run `python -m iconmatting_core` from the pack's folder; `iconmatting ...` takes the same commands
        as `python -m iconmatting_core matte` (under `torchrun` too); for clips, `python -m iconmatting_core matte --context
        ref_context.safetensors --targets clip.mp4 --out mattes/`; measure with `python benchmarks/benchmark.py`.
        """)
    assert [p.id for p in plans] == ["README.md:3", "README.md:7", "README.md:8"]
    assert plans[1].same_as == "README.md:3"  # broken over two lines, the same command: run once
    assert plans[2].steps[0].kind == "skip" and "full-size SD" in plans[2].steps[0].reason


def test_blocks_without_a_shell_language_count_only_their_commands(tmp_path):
    plans = _plans(tmp_path, """
        ```
        my_mattes/
        └── mascot/images/001.jpg
        ```

        ```
        python -m iconmatting_core encode --reference ref.jpg --mask ref_mask.png --out c.safetensors
        ```
        """)
    assert [len(p.runs) for p in plans] == [0, 1]


def test_python_blocks_name_what_they_need(tmp_path):
    inputs, names = R.python_block_needs("README.md:1", 'from iconmatting_core import load_pipeline\n'
                                         'pipe = load_pipeline("icm.ckpt", "v2-1_768-ema-pruned.safetensors")\n'
                                         'alphas = pipe.matte(pipe.encode_reference(ref_image, ref_mask), target_images)\n')
    assert inputs == {"icm.ckpt": "authors_head", "v2-1_768-ema-pruned.safetensors": "sd"}
    assert names == ["ref_image", "ref_mask", "target_images"]
    with pytest.raises(R.MappingError, match=r"\['my_photo'\].*PYTHON_NAMES"):
        R.python_block_needs("README.md:1", "from iconmatting_core import load_pipeline\nload_pipeline(my_photo)\n")
