"""The documentation holds together: README.md stays a front page, and every relative link of README.md and
docs/*.md, and every docs/ path named in code, configs, scripts and the Makefile, points at something that exists
(for a #anchor: a heading of the target page, slugged as GitHub slugs it). The three scripts' --help states
their real defaults and the registries' choices, the docs' flag tables agree with it, and every command of the
docs' code blocks names flags, values, configs and run folders that exist (the cheap ones are run)."""
import argparse
import math
import os
import re
from pathlib import Path

import pytest

from conftest import ROOT

README_LIMIT = 15_000
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/_incoming/ is not published yet
CODE_SUFFIXES = (".py", ".sh", ".toml")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "data", "runs", "checkpoints"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*[\w/]")


def prose_lines(text):
    """The lines of a Markdown text outside fenced and indented code blocks."""
    in_fence = in_indented = False
    previous_blank = True
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif in_fence:
            continue
        elif line.startswith(("    ", "\t")) and (previous_blank or in_indented):
            in_indented = True  # an indented code block starts after a blank line and runs to the next text
        elif not line.strip():
            previous_blank = True
            continue
        else:
            in_indented = False
            yield line
        previous_blank = False


def github_slug(heading):
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped (letters, digits,
    underscores, hyphens and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text)  # code and emphasis marks
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file; repeated slugs get -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def broken_links(page):
    """(link, why) for each relative link of a Markdown page that does not resolve."""
    bad = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                bad.append((target, f"no file {dest}"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append((target, f"no heading #{anchor} in {dest.name}"))
    return bad


def code_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(CODE_SUFFIXES) or name == "Makefile":
                yield Path(dirpath) / name


def missing_docs_paths(root):
    """(file, path) for each docs/... path named in a code, config or script file that does not exist."""
    missing = []
    for f in code_files(root):
        if f.resolve() == Path(__file__).resolve():  # this file names made-up pages on purpose
            continue
        for path in DOCS_PATH.findall(f.read_text(encoding="utf-8", errors="replace")):
            path = path.rstrip(".")
            if "*" not in path and "<" not in path and not (root / path).exists():
                missing.append((str(f.relative_to(root)), path))
    return missing


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert n <= README_LIMIT, f"README.md has {n} characters; the front page keeps to {README_LIMIT}: move text to docs/"


def test_every_relative_link_resolves():
    assert len(PAGES) > 1, "docs/*.md missing"
    bad = {p.name: broken_links(p) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_every_docs_path_named_in_code_exists():
    assert not missing_docs_paths(ROOT)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The checkers report a missing file, a missing anchor and a missing docs/ path, and accept what exists,
    code blocks and inline code left alone."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# A page\n\n## Recipe (`configs/coco/`)\n\n## Speed\n\n## Speed\n\n### 2. Configs: the paper's recipe\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "See [page](docs/page.md), [recipe](docs/page.md#recipe-configscoco), [again](docs/page.md#speed-1),\n"
        "[step](docs/page.md#2-configs-the-papers-recipe), [web](https://example.org/x) and [top](#top).\n\n"
        "# Top\n\n    [not a link](nowhere.md)\n\n```\n[nor this](nowhere.md)\n```\n\n`[code](nowhere.md)`\n")
    assert broken_links(readme) == []
    readme.write_text("[gone](docs/gone.md) [bad anchor](docs/page.md#speeds) [self](#nothing)\n")
    assert [t for t, _ in broken_links(readme)] == ["docs/gone.md", "docs/page.md#speeds", "#nothing"]
    (tmp_path / "tool.py").write_text('"""See docs/page.md and docs/missing.md."""\n')
    (tmp_path / "Makefile").write_text("doc:\n\tcat docs/page.md docs/gone.md\n")
    assert sorted(missing_docs_paths(tmp_path)) == [("Makefile", "docs/gone.md"), ("tool.py", "docs/missing.md")]


# --- --help tells the truth, and the docs' flag tables agree with it -------------------------------------

def script_parsers():
    """{script: its parser} for the three training scripts."""
    import main_cifar
    import main_coco
    import main_imagenet
    return {"main_imagenet.py": main_imagenet.get_args_parser(), "main_cifar.py": main_cifar.get_args_parser(),
            "main_coco.py": main_coco.get_args_parser()}


def help_of(parser, action):
    """An action's help as --help prints it (%(default)s and the like expanded), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def shown_actions(parser):
    """The flags --help lists (not -h itself, not the hidden aliases of the reference's names)."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"]


def shown_default(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def test_help_shows_each_scripts_own_defaults():
    """Every flag has a help text, and every help text states the flag's real default (the value the
    parser gives, so the text cannot drift from it); main_coco's two-valued defaults name both values
    resolve_defaults picks."""
    import main_coco
    for script, parser in script_parsers().items():
        for action in shown_actions(parser):
            text = help_of(parser, action)
            assert text.strip(), f"{script} {action.option_strings or action.dest}: no help text"
            if action.default not in (None, False, "", [], argparse.SUPPRESS):
                assert f"default: {shown_default(action.default)}" in text, (script, action.dest, text)
    helps = {s: {a.dest: help_of(p, a) for a in shown_actions(p)} for s, p in script_parsers().items()}
    for key in ("epochs", "batch_size", "min_size", "max_size", "warmup_iters"):
        dest_help = helps["main_coco.py"][key]
        assert (f"default: {main_coco.RECIPE_DEFAULTS[key]}; demo set: {main_coco.DEMO_DEFAULTS[key]}"
                in dest_help), dest_help
    # the values issue 23 found misreported, as the scripts really use them
    assert "(default: resnet20)" in helps["main_cifar.py"]["arch"]
    assert "(default: 164)" in helps["main_cifar.py"]["epochs"]
    assert "(default: 128)" in helps["main_cifar.py"]["batch_size"]
    assert "(default: 0.0005)" in helps["main_cifar.py"]["weight_decay"]
    assert "(default: 81 122," in helps["main_cifar.py"]["milestones"]
    assert "30 epochs" not in helps["main_cifar.py"]["cos_lr"]
    assert "(default: resnet50)" in helps["main_coco.py"]["arch"] and "(default: 0.02)" in helps["main_coco.py"]["lr"]
    assert "(default: 8 11," in helps["main_coco.py"]["milestones"]


def test_help_lists_the_registries(monkeypatch):
    """-a lists the script's archs and --attention_type every registered module, read from the registries
    when the parser is built: a module added to ATTENTIONS shows with no other edit."""
    import main_cifar
    import main_coco
    import main_imagenet
    from networks import ATTENTION_CHOICES, model_names
    from networks.attentions import ATTENTIONS, SimAM
    archs = {"main_imagenet.py": main_imagenet.TASK.archs, "main_cifar.py": model_names("cifar"),
             "main_coco.py": main_coco.ARCHS}
    for script, parser in script_parsers().items():
        actions = {a.dest: a for a in parser._actions}
        listed = help_of(parser, actions["arch"]).split("(default")[0]
        assert re.findall(r"[\w.]+", listed.split(":", 1)[1]) == list(archs[script]), script
        listed = help_of(parser, actions["attention_type"]).split("(default")[0]
        assert re.findall(r"\w+", listed.split(":", 1)[1]) == list(ATTENTION_CHOICES), script

    class MyModule(SimAM):
        default_param = 0.5

    monkeypatch.setitem(ATTENTIONS, "mymodule", MyModule)
    parser = main_cifar.get_args_parser()
    actions = {a.dest: a for a in parser._actions}
    assert "| mymodule (default" in help_of(parser, actions["attention_type"])
    assert "mymodule 0.5)" in help_of(parser, actions["attention_param"])


def test_coco_refuses_the_classifier_only_flags(capsys, tmp_path):
    """main_coco.py does not offer the classifiers' schedule and loss flags it would ignore: each is
    refused in one line (exit 2) on the command line, and in a config file, and --help lists none."""
    import main_coco
    from utils import UserError
    from utils.args import CLASSIFIER_ONLY, parse_args
    parser = main_coco.get_args_parser()
    flags = ["--cos_lr", "--cos-ref-shift", "--warmup-epochs", "--label-smoothing"]
    offered = {s for a in parser._actions for s in a.option_strings}
    assert not offered & set(flags) and not set(CLASSIFIER_ONLY) & {a.dest for a in parser._actions}
    for argv in (["--cos_lr"], ["--cos-ref-shift"], ["--warmup-epochs", "2"], ["--label-smoothing", "0.1"]):
        with pytest.raises(SystemExit) as e:
            parse_args(main_coco.get_args_parser(), argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and f"unrecognized arguments: {argv[0]}" in err
    for key in CLASSIFIER_ONLY:
        config = tmp_path / f"{key}.toml"
        config.write_text(f"{key} = 1.0\n" if "epochs" in key or "smoothing" in key else f"{key} = true\n")
        with pytest.raises(UserError, match=f"unknown key '{key}' in config file"):
            parse_args(main_coco.get_args_parser(), ["--config", str(config)])
    # not offered, the trainer still reads them: off
    assert vars(parse_args(main_coco.get_args_parser(), [])).items() >= CLASSIFIER_ONLY.items()


FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def flag_table(page):
    """The rows of a page's flag table (the first table whose header's first cell is `flag`):
    [(flags named in the first cell, the default cell, the whole row)]."""
    rows, in_table = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == "flag":
            in_table = True
        elif in_table and not cells:
            break
        elif in_table and not set(cells[0]) <= set("-: "):
            flags = [f for span in re.findall(r"`([^`]*)`", cells[0]) for f in FLAG.findall(span.split(" ")[0])]
            rows.append((flags, cells[1], line))
    return rows


def states(cell, value):
    """False when a table's default cell states a value other than `value`; True when it states `value`
    or describes the default in words (`module's own`, `--wd`)."""
    text = re.split(r";| \(", cell.replace("`", ""))[0].strip()
    if text in ("off", "on", "none", ""):
        return {"off": value in (False, None, 0, "off"), "on": value is True,
                "none": value in (None, "none"), "": True}[text]
    numbers = text.split()
    try:
        stated = [float(n) for n in numbers]
    except ValueError:  # a name (compared with a string default) or words describing the default
        return text == value if isinstance(value, str) and re.fullmatch(r"[\w.-]+", text) else True
    values = value if isinstance(value, (list, tuple)) else [value]
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            and len(values) == len(stated) and all(math.isclose(float(v), s) for v, s in zip(values, stated)))


def effective_defaults(script, parser):
    """What a run gets without flags: the parser's defaults (main_coco: with DATA, resolve_defaults')."""
    from utils.args import parse_args
    if script == "main_coco.py":
        import main_coco
        return vars(main_coco.resolve_defaults(parse_args(parser, ["DATA"])))
    return vars(parse_args(parser, []))


FLAG_PAGES = {"main_imagenet.py": "imagenet.md", "main_cifar.py": "cifar.md", "main_coco.py": "coco.md"}


def table_disagreements(script, parser, page):
    """What a page's flag table gets wrong against --help: flags missing from it, flags --help does not
    list, defaults it states otherwise, registry names its -a / --attention_type rows leave out."""
    shown = shown_actions(parser)
    by_flag = {s: a for a in shown for s in a.option_strings}
    defaults = effective_defaults(script, parser)
    rows = flag_table(page)
    problems = []
    if not rows:
        return [f"{page.name}: no flag table (| flag | default | meaning |)"]
    named = {f for flags, _, _ in rows for f in flags}
    for action in shown:
        if action.option_strings and not set(action.option_strings) & named:
            problems.append(f"{script} {action.option_strings[0]} is not in {page.name}'s table")
    for flags, cell, line in rows:
        unknown = [f for f in flags if f not in by_flag]
        problems += [f"{page.name} names {f}, which {script} --help does not list" for f in unknown]
        actions = list(dict.fromkeys(by_flag[f] for f in flags if f in by_flag))
        parts = [cell] if len(actions) == 1 else cell.split(", ")
        if len(parts) == len(actions):
            for action, part in zip(actions, parts):
                if not states(part, defaults[action.dest]):
                    problems.append(f"{page.name}: {action.option_strings[0]} default {part!r}, "
                                    f"{script} has {shown_default(defaults[action.dest])}")
        for action in actions:
            if action.dest in ("arch", "attention_type"):
                listed = re.findall(r"[\w.]+", help_of(parser, action).split("(default")[0].split(":", 1)[1])
                problems += [f"{page.name}: {action.option_strings[0]} row leaves out {n}" for n in listed
                             if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", line)]
    return problems


def test_flag_tables_agree_with_help():
    """Each script's docs page has a flag table naming every flag --help lists and no other, with the
    defaults --help states, and every arch and attention type the registries hold."""
    for script, parser in script_parsers().items():
        assert not table_disagreements(script, parser, ROOT / "docs" / FLAG_PAGES[script])


def test_table_check_catches_what_it_is_for(tmp_path):
    """The table checker reports a missing flag, an unknown one, a wrong default and a left-out attention type."""
    import main_cifar
    parser = main_cifar.get_args_parser()
    page = tmp_path / "cifar.md"
    good = (ROOT / "docs" / "cifar.md").read_text(encoding="utf-8")
    page.write_text(good)
    assert table_disagreements("main_cifar.py", parser, page) == []
    row = next(line for line in good.splitlines() if line.startswith("| `--epochs"))
    page.write_text(good.replace(row, row.replace("164", "165") + "\n| `--no-such-flag` | off | x |")
                    .replace("`--test-batch-size N`", "`--tbs N`").replace("triplet", "trip"))
    found = "\n".join(table_disagreements("main_cifar.py", parser, page))
    for what in ("--epochs default '165'", "names --no-such-flag", "--test-batch-size is not in",
                 "leaves out triplet"):
        assert what in found, found


# --- every command of README.md and docs/*.md runs as written ------------------------------------------

MAIN_SCRIPTS = ("main_imagenet.py", "main_cifar.py", "main_coco.py")
# Flags docs/own-experiments.md documents that another branch adds (issue 23: fine-tuning). Once the flag
# exists, test_pending_flags_are_still_pending fails: delete it here.
PENDING_FLAGS = ()
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # DATA, DIR, CKPT, RUN_R50, F: the reader's own


def code_lines(text):
    """(line number, line) of a Markdown text's fenced and indented code blocks (prose_lines' complement)."""
    in_fence = in_indented = False
    previous_blank = True
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            yield n, line
        elif line.startswith(("    ", "\t")) and (previous_blank or in_indented):
            in_indented = True
            yield n, line
        elif not line.strip():
            previous_blank = True
            continue
        else:
            in_indented = False
        previous_blank = False


def doc_commands(page):
    """(where, argv) of each shell command in a page's code blocks: continuation lines joined, comments
    and leading VAR=value assignments dropped, `a && b` split; argv starts at the program."""
    import shlex
    out, pending, start = [], "", None
    for n, line in code_lines(page.read_text(encoding="utf-8")):
        start = start or n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError:  # not shell (a Python snippet, a layout sketch)
            tokens = []
        command = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "|"):
                while command and (re.fullmatch(r"\w+=.*", command[0]) or command[0] in ("do", "then", "else")):
                    command.pop(0)
                if command:
                    out.append((f"{page.name}:{start}", command))
                command = []
            else:
                command.append(tok)
        start = None
    return out


def script_and_args(argv):
    """(script, its arguments) for `python X`, `torchrun [opts] X`, `X` (a scripts/ file), `make T`;
    None for other programs."""
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1] != "-":
        return argv[1], argv[2:]
    if argv[0] == "torchrun":
        i = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
        return (argv[i], argv[i + 1:]) if i is not None else None
    if argv[0] == "sbatch":
        i = next((i for i, a in enumerate(argv) if a.startswith("scripts/")), None)
        return (argv[i], argv[i + 1:]) if i is not None else None
    if argv[0].startswith("scripts/") or argv[0] == "make":
        return argv[0], argv[1:]
    return None


def without_elisions(parser, args):
    """The arguments with `...` and `[flags]` placeholders left out (and a flag whose value was one)."""
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    kept = []
    for a in args:
        if "..." in a or re.fullmatch(r"\[.*\]", a) or a.startswith("$"):  # $lr: a loop's variable
            if kept and kept[-1] in takes_value:
                kept.pop()
            continue
        kept.append(a)
    return kept


def main_command_problems(script, args):
    """What is wrong with `python SCRIPT ARGS` as written: a flag the parser does not know, a bad value,
    a --config that does not exist, an arch or attention type the script refuses, a run-folder
    checkpoint (checkpoint.pth.tar, model_best.pth.tar) outside the run folder this command's own
    settings name."""
    import main_cifar
    import main_coco
    import main_imagenet
    from utils import UserError
    from utils.args import given, parse_args
    from utils.recipe import run_name
    from utils.trainer import check_args, effective_param
    module = {"main_imagenet.py": main_imagenet, "main_cifar.py": main_cifar, "main_coco.py": main_coco}[script]
    parser = module.get_args_parser()
    args = without_elisions(parser, args)
    for flag in PENDING_FLAGS:  # documented, not merged yet: left out with its value
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    try:
        import contextlib
        import io
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            parsed = parse_args(parser, args)
    except SystemExit as e:  # --help: 0; a bad command line: 2 and its error line
        return [err.getvalue().strip()] if e.code else []
    except UserError as e:
        return [str(e)]
    if script == "main_coco.py":
        main_coco.resolve_defaults(parsed)
    task = module.TASK if script == "main_imagenet.py" else module.make_task(parsed)
    resume, problems = parsed.resume, []
    parsed.resume = __file__ if resume else ""  # a file that exists: whether it will is checked below
    if getattr(parsed, "pretrained", None):  # the reader's own weights file, as --resume's
        parsed.pretrained = __file__
    try:
        check_args(parsed, task)
    except UserError as e:
        problems.append(str(e))
    if Path(resume).name in ("checkpoint.pth.tar", "model_best.pth.tar") and \
            not any(PLACEHOLDER.fullmatch(part) for part in Path(resume).parts):
        run = Path(parsed.ckpt) / run_name(task.name, parsed.arch, parsed.attention_type, effective_param(parsed),
                                           parsed.seed)
        folder = Path(resume).parent
        if (parsed.evaluate or parsed.save_weights) and not {"arch", "attention_type"} <= given(parsed):
            # -e / --save_weights read what the command leaves out from the checkpoint: the folder must be
            # a run folder of this task agreeing with what the command gives
            wants = [f"-{getattr(parsed, d)}-" for d in ("arch", "attention_type")
                     if d in given(parsed) and getattr(parsed, d) != "none"]
            wants += [f"-seed{parsed.seed}-"] if "seed" in given(parsed) else []
            if folder.parent != Path(parsed.ckpt) or not folder.name.startswith(f"{task.name}-") or \
                    not all(w in f"{folder.name}-" for w in wants):
                problems.append(f"--resume {resume}: not a {task.name} run folder of {parsed.ckpt}/ "
                                f"agreeing with the command")
        elif folder != run:
            problems.append(f"--resume {resume}: this command's run folder is {run}/")
    return problems


def command_problems(argv):
    """What is wrong with one documented command (see main_command_problems); for scripts/ and make:
    the file or target exists, every --flag appears in the script's source, every configs/ path exists."""
    found = script_and_args(argv)
    if found is None:
        return []
    script, args = found
    if script == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
        return [f"no make target {t}" for t in args if "=" not in t and t not in targets]
    if Path(script).name in MAIN_SCRIPTS:
        if script.startswith("/"):
            return []
        return ([] if (ROOT / script).is_file() else [f"no file {script}"]) or main_command_problems(script, args)
    if not (ROOT / script).is_file():
        return [f"no file {script}"]
    problems = [f"no file {a}" for a in args if a.startswith("configs/") and "..." not in a and "THIS" not in a
                and not (ROOT / a).exists()]
    if script.endswith((".sh", ".py")):
        source = (ROOT / script).read_text(encoding="utf-8")
        for a in args:
            flag = re.match(r"(--?[A-Za-z][\w-]*)", a.lstrip("["))
            if flag and script.endswith(".py") and f'"{flag.group(1)}"' not in source:
                problems.append(f"{script} has no flag {flag.group(1)}")
    # the launchers: the flags they hand to a trainer, parsed by that trainer
    name = Path(script).name
    if name == "cifar_seeds.sh" and args:
        problems += main_command_problems("main_cifar.py", args[1:] + ["--seed", "0"])
    elif name == "lambda_sweep.sh" and len(args) >= 2:
        trainer = {"cifar": "main_cifar.py", "imagenet": "main_imagenet.py"}.get(args[0])
        problems += main_command_problems(trainer, args[2:]) if trainer else [f"{script}: no trainer {args[0]}"]
    elif name == "reproduce_imagenet.sh" and args:
        problems += main_command_problems("main_imagenet.py", args)
    if name in ("train.sh", "slurm_train.sh") and len(args) >= 2:
        config, data, rest = args[0], args[1], args[2:]
        text = (ROOT / config).read_text(encoding="utf-8") if (ROOT / config).is_file() else ""
        main = "main_coco.py" if re.search(r"^detector\s*=", text, re.M) else "main_imagenet.py"
        problems += main_command_problems(main, [data, *rest] + (["--config", config] if text else []))
    return problems


def test_every_documented_command_is_valid():
    """Every command in README.md's and docs/*.md's code blocks names scripts, make targets, flags and
    configs that exist, with values the script takes, and a checkpoint path in the run folder its own
    settings write."""
    commands = [c for page in PAGES for c in doc_commands(page)]
    assert len(commands) > 50, "the extractor found too few commands"
    bad = {f"{where}: {' '.join(argv)}": p for where, argv in commands for p in [command_problems(argv)] if p}
    assert not bad


def test_command_check_catches_what_it_is_for(tmp_path):
    """The command checker reports README's former `-e --resume model_best.pth.tar`, cifar.md's former
    `-seed0` path, an unknown flag, a missing config, a bad arch (given to a trainer or through a launcher)
    and a missing make target, and accepts elided commands."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n"
        "    python main_imagenet.py DATA -a resnet50 --attention_type simam -e --resume model_best.pth.tar\n"
        "    python main_cifar.py --dataset cifar100 -a resnet20 --attention_type simam --attention_param 1e-4 \\\n"
        "        -e --resume checkpoints/cifar100-resnet20-simam-param0.0001-seed0/model_best.pth.tar\n"
        "    OMP_NUM_THREADS=1 python main_coco.py --no-such-flag && make nothing\n"
        "    python main_imagenet.py -e --resume checkpoints/imagenet-resnet50-simam-param0.1/model_best.pth.tar\n"
        "    python main_imagenet.py -a resnet18 -e --resume checkpoints/imagenet-resnet50/model_best.pth.tar\n"
        "\n```\ntorchrun --nproc_per_node=2 main_imagenet.py DATA --config configs/none.toml\n"
        "python main_cifar.py -a resnet18   # an ImageNet arch\n"
        "python main_imagenet.py DATA -a resnet18 --seed 3 -e \\\n"
        "    --resume checkpoints/imagenet-resnet18-seed3/checkpoint.pth.tar\n"
        "python main_coco.py DATA --config configs/coco/... --gpu 0,1 ...\n"
        "scripts/cifar_seeds.sh \"0 1\" --dataset cifar100 -a resnet50\n```\n")
    found = [(w.split(":")[1], command_problems(argv)) for w, argv in doc_commands(page)]
    assert [w for w, _ in found] == ["3", "4", "6", "6", "7", "8", "11", "12", "13", "15", "16"]
    problems = [p for _, ps in found for p in ps]
    assert len([ps for _, ps in found if ps]) == 8, found
    assert not found[4][1] and "not a imagenet run folder" in found[5][1][0]  # -e reads the rest from the file
    assert any("imagenet-resnet50-simam-param0.0001/" in p for p in problems)
    assert any("cifar100-resnet20-simam-param0.0001/" in p for p in problems)
    assert any("--no-such-flag" in p for p in problems) and "no make target nothing" in problems
    assert any("configs/none.toml" in p for p in problems) and any("unknown arch 'resnet18'" in p for p in problems)
    assert any("unknown arch 'resnet50'" in p for p in problems)  # the flags cifar_seeds.sh hands to main_cifar.py


# Documented commands cheap enough to run here, in this process (each a script's main(argv)), with the
# exit status the page promises; the test fails if a page stops showing one, so the list cannot go stale.
CHEAP_COMMANDS = {("reliability.md", "python main_imagenet.py /no/such/folder"): 1,
                  ("own-experiments.md", "python main_imagenet.py --help"): 0,
                  ("own-experiments.md", "python main_cifar.py --help"): 0,
                  ("own-experiments.md", "python main_coco.py --help"): 0}


def test_cheap_documented_commands_run(capsys):
    """The cheap commands of the docs run as written: a refusal is one `error:` line and exit 1, --help
    exits 0 and prints every flag of the parser."""
    import importlib
    shown = {(Path(w.split(":")[0]).name, " ".join(argv)) for page in PAGES for w, argv in doc_commands(page)}
    for (page, command), status in CHEAP_COMMANDS.items():
        assert (page, command) in shown, f"{page} no longer shows `{command}`"
        _, script, *argv = command.split()
        module = importlib.import_module(script.removesuffix(".py"))
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        out, err = capsys.readouterr()
        assert e.value.code == status, (command, out[-500:], err[-500:])
        if status:
            assert err.startswith("error: ") and err.count("\n") == 1, err
        else:
            flags = {s for a in shown_actions(module.get_args_parser()) for s in a.option_strings}
            assert flags and all(f in out for f in flags), command


def test_pending_flags_are_still_pending():
    """A documented flag the checker leaves out because its branch has not landed must not exist yet."""
    known = {s for parser in script_parsers().values() for a in parser._actions for s in a.option_strings}
    assert not known & set(PENDING_FLAGS), "these flags exist now: remove them from PENDING_FLAGS"
