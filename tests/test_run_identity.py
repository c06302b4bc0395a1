"""A run is its recipe (issue 23): a changed setting is another run, never the old one resumed,
continued or reported; --resume takes the run's own settings; --config RUN/args.json replays a run;
tables group runs by recipe. Tiny data, 1-epoch runs, in this process."""
import csv
import glob
import importlib.util
import json
import shutil

import pytest
import torch

import main_imagenet
from conftest import ROOT, TINY, main_in_process, make_tiny_data, run_dir, seed
from utils.recipe import run_name
from utils.reporting.runs import effective_param

LRS = ("0.1", "0.01")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest's, for every test of this file
    yield


def flags(data, ckpt, *extra):
    return [data, *TINY, "-b", "8", "-j", "0", "--seed", seed(0), "--epochs", "1", "--ckpt", ckpt, *extra]


def main(argv, code=0):
    return main_in_process(argv, code)


def error(argv):
    _, err = main(argv, code=1)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def snapshot(run):
    return {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name not in ("log.txt", ".lock")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`for lr in 0.1 0.01; do main_imagenet.py DATA ... --lr $lr; done`: the issue's sweep loop."""
    tmp = tmp_path_factory.mktemp("identity")
    data = make_tiny_data(tmp / "data")
    ckpt = tmp / "ck"
    for lr in LRS:
        with pytest.raises(SystemExit) as exc:
            main_imagenet.main([str(a) for a in flags(data, ckpt, "--lr", lr)])
            raise SystemExit(0)
        assert exc.value.code == 0
    return data, ckpt


def test_a_sweep_over_lr_gives_one_run_and_one_table_row_per_value(sweep, capsys):
    data, ckpt = sweep
    runs = {lr: run_dir(flags(data, ckpt, "--lr", lr)) for lr in LRS}
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(r.name for r in runs.values())  # two folders
    for lr, run in runs.items():
        assert json.loads((run / "args.json").read_text())["lr"] == float(lr)
        assert torch.load(run / "checkpoint.pth.tar", weights_only=True)["args"]["lr"] == float(lr)
        recipe_line = next(ln for ln in (run / "log.txt").read_text().splitlines() if "recipe: " in ln)
        assert ("lr=0.01" in recipe_line) == (lr == "0.01") and "epochs=1" in recipe_line  # what differs is said
    script("make_table").main([str(ckpt), "--csv"])
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert sorted(r["settings"] for r in rows) == ["lr=0.01", "lr=0.1"] and [r["seeds"] for r in rows] == ["1", "1"]
    for r in rows:
        assert r["source"] == str(runs[r["settings"].removeprefix("lr=")])
    # Another kind of recipe flag names another folder too; -j, -p or --ckpt's location do not.
    names = {run_dir(flags(data, ckpt, *extra)).name for extra in
             ([], ["--wd", "5e-4"], ["--mixup-alpha", "0.2"], ["--amp", "bf16"], ["--epochs", "2"])}
    assert len(names) == 5
    assert run_dir(flags(data, ckpt, "-j", "2", "-p", "1")) == run_dir(flags(data, ckpt))


def test_the_same_command_again_is_finished(sweep, capsys):
    data, ckpt = sweep
    run = run_dir(flags(data, ckpt, "--lr", "0.01"))
    before = snapshot(run)
    out, _ = main(flags(data, ckpt, "--lr", "0.01"))
    assert f"run {run} is already finished" in out and out.rstrip().splitlines()[-1].endswith(f"run folder: {run}")
    assert snapshot(run) == before


def test_resume_with_a_differing_flag_is_refused_naming_it(sweep, capsys):
    data, ckpt = sweep
    run = run_dir(flags(data, ckpt, "--lr", "0.01"))
    before = snapshot(run)
    err = error([data, "--resume", run / "checkpoint.pth.tar", "--lr", "0.1", "--wd", "1e-4", "-j", "0"])
    assert "lr=0.1 (the run: 0.01)" in err and "weight_decay" not in err  # --wd 1e-4 is the run's own
    assert snapshot(run) == before


def test_resume_without_seed_trains_on_in_its_own_folder_with_a_raised_epochs(sweep, tmp_path, capsys):
    """`--resume RUN-seedN/checkpoint.pth.tar --epochs 2`, nothing else: the run's own settings (seed, lr,
    sizes, data), in its own folder, which it says; args.json then records the whole recipe."""
    data, ckpt = sweep
    run = tmp_path / run_dir(flags(data, ckpt, "--lr", "0.01")).name
    shutil.copytree(run_dir(flags(data, ckpt, "--lr", "0.01")), run)
    out, _ = main(["--resume", run / "checkpoint.pth.tar", "--epochs", "2", "-j", "0"])
    assert f"note: --epochs 2: training on in {run} (the run had 1 epochs)" in out
    assert out.rstrip().splitlines()[-1].endswith(f"run folder: {run}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.name]  # no second folder
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    settings = json.loads((run / "args.json").read_text())
    assert (settings["lr"], settings["epochs"], settings["seed"], settings["train_crop_size"]) == (0.01, 2, seed(0), 32)
    assert settings["data_realpath"] == str(data.resolve())


def test_another_recipe_or_data_in_an_existing_folder_is_refused(sweep, tmp_path, capsys):
    """Two configs of one arch and attention name one folder: the second is refused naming the setting.
    A run trained on other data is refused too, unless resumed explicitly (a moved dataset: a note)."""
    data, ckpt = sweep
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('arch = "resnet18"\nlr = 0.1\n')
    b.write_text('arch = "resnet18"\nlr = 0.01\nweight_decay = 5e-4\n')
    cmd_a, cmd_b = flags(data, tmp_path, "--config", a), flags(data, tmp_path, "--config", b)
    assert run_dir(cmd_a) == run_dir(cmd_b)  # each config's values are its defaults: no digest for them
    shutil.copytree(run_dir(flags(data, ckpt, "--lr", "0.1")), run_dir(cmd_a))  # config a's run (lr 0.1)
    before = snapshot(run_dir(cmd_a))
    err = error(cmd_b)
    assert f"run folder {run_dir(cmd_a)} holds a run of other settings: " in err
    assert "lr=0.01 (the run: 0.1)" in err and "weight_decay=0.0005 (the run: 0.0001)" in err
    assert snapshot(run_dir(cmd_a)) == before

    moved = tmp_path / "moved data"
    shutil.copytree(data, moved)
    err = error(flags(moved, tmp_path, "--config", a))
    assert f"was trained on the data at {data.resolve()}, this command's is {moved.resolve()}" in err
    assert snapshot(run_dir(cmd_a)) == before
    out, _ = main([moved, "--resume", run_dir(cmd_a) / "checkpoint.pth.tar", "-j", "0"])
    assert f"note: the run was trained on the data at {data.resolve()}; it continues on {moved.resolve()}" in out


def test_config_args_json_replays_the_run_into_its_folder(sweep, capsys):
    data, ckpt = sweep
    run = run_dir(flags(data, ckpt, "--lr", "0.01"))
    replay = ["--config", run / "args.json"]
    assert run_dir(replay) == run
    before = snapshot(run)
    out, _ = main(replay)
    assert f"run {run} is already finished" in out
    assert snapshot(run) == before


def test_the_papers_configs_keep_their_folder_names():
    for cfg in sorted(glob.glob(str(ROOT / "configs" / "imagenet" / "**" / "*.toml"), recursive=True)):
        got = run_dir(["DATA", "--config", cfg])
        a = tomllib_load(cfg)
        want = run_name("imagenet", a["arch"], a.get("attention_type", "none"),
                        effective_param(a.get("attention_type", "none"), a.get("attention_param")), None)
        assert got.name == want, cfg
    for cfg in sorted(glob.glob(str(ROOT / "configs" / "coco" / "*.toml"))):
        a = tomllib_load(cfg)
        want = run_name(f"coco-{a['detector']}", a["arch"], a.get("attention_type", "none"),
                        effective_param(a.get("attention_type", "none"), a.get("attention_param")), None)
        assert run_dir(["DATA", "--config", cfg], script="main_coco.py").name == want, cfg


def tomllib_load(path):
    import tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def fake_run(root, name, best, epochs=1, seed=None, seed_used=None, **settings):
    run = root / name
    run.mkdir(parents=True)
    args = dict(dataset="cifar100", arch="resnet20", attention_type="simam", attention_param=0.1, epochs=epochs,
                lr=0.1, seed=seed, seed_used=seed if seed is not None else seed_used, classes=100, **settings)
    (run / "args.json").write_text(json.dumps(args))
    (run / "metrics.jsonl").write_text("".join(json.dumps(dict(epoch=e, val_acc1=best, val_acc5=best, val_loss=1.0))
                                               + "\n" for e in range(1, epochs + 1)))
    return run


def test_tables_keep_recipes_apart_and_show_no_drawn_seed(tmp_path, capsys):
    """The issue's table: an unseeded 2-epoch run and two 1-epoch runs were one "3 seeds" row showing the
    drawn seed. Now: one row per recipe, a drawn seed is not shown; plot_sweep draws a paper-recipe and
    a modern-recipe run as two lines, not two seeds."""
    fake_run(tmp_path, "a", 50.0, epochs=2, seed_used=1691015952)
    fake_run(tmp_path, "b", 60.0, seed=0)
    fake_run(tmp_path, "c", 62.0, seed=1)
    script("make_table").main([str(tmp_path)])
    md = capsys.readouterr().out
    lines = [ln for ln in md.splitlines() if ln.startswith("| resnet20 (CIFAR-100)")]
    assert len(lines) == 2 and "1691015952" not in md
    one, two = (next(ln for ln in lines if f"| epochs={n} |" in ln) for n in (1, 2))
    assert "| 1/1 | 2 | 61.00 ± 1.41 |" in one and "| 2/2 | 1 | 50.00 |" in two

    sweep_dir = tmp_path / "sweep"
    fake_run(sweep_dir, "paper", 60.0, seed=0)
    fake_run(sweep_dir, "modern", 70.0, seed=1, mixup_alpha=0.2)
    ps = script("plot_sweep")
    models = ps.sweep([ps.run_row(r) for r in ps.find_runs([sweep_dir])])
    assert sorted(k[3] for k in models) == ["mixup_alpha=0.2", "mixup_alpha=null"]
    assert [[p["seeds"] for p in m["points"]] for m in models.values()] == [[1], [1]]


def test_the_makefiles_demo_run_is_the_folder_the_demo_trains_in():
    import re
    demo = script("demo")
    (line,) = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("DEMO_RUN :=")]
    assert re.match(r"DEMO_RUN := (\S+)", line).group(1) == str(demo.demo_run_dir())
