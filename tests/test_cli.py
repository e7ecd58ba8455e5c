"""The featx command, run for real in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from featx.cli import main, parse_size


def featx(*args, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.parametrize("cmd", [[], ["layers"], ["extract"], ["evaluate"], ["demo"], ["cache"], ["cache", "info"], ["cache", "prune"]])
def test_help_everywhere(cmd):
    res = featx(*cmd, "--help")
    assert res.returncode == 0 and "usage: featx" in res.stdout


def test_layers():
    res = featx("layers", "resnet18", "--input-size", "64")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["layer", "alias", "channels", "output", "shape"]
    assert any(line.split()[:3] == ["layer4", "stage5", "512"] and "(512, 2, 2)" in line for line in lines)


def test_extract_and_cache_commands_for_real(image_folder, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "f.npz"
    res = featx("extract", image_folder, "-o", out, "--cache-dir", cache, "--layers", "stage4,pre_logits")
    assert res.returncode == 0, res.stderr
    summary, compute = res.stdout.strip().splitlines()[-2:]
    assert summary.startswith("24 images, 1392 features") and "images/s" in summary and "cache hits 0" in summary
    from featx._runtime.device import cpu_native_bf16

    assert compute.startswith(f"computed on cpu in {'bf16' if cpu_native_bf16() else 'fp32'} with torch")
    z = np.load(out)
    assert z["features"].shape == (24, 1392) and len(z["paths"]) == 24 and z["feature_names"][0] == "stage4_avg_0"
    info = featx("cache", "--cache-dir", cache, "info")
    assert info.returncode == 0 and "featx:efficientnet_lite0" in info.stdout and "images=24" in info.stdout
    pruned = featx("cache", "--cache-dir", cache, "prune", "--max-size", "50K")
    assert pruned.returncode == 0 and "evicted" in pruned.stdout
    assert (cache / "featx-cache.sqlite").stat().st_size <= 50 * 1024
    cleared = featx("cache", "--cache-dir", cache, "clear")
    assert cleared.returncode == 0 and "removed" in cleared.stdout


def test_extract_formats(image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    outs = {}
    for i, ext in enumerate(["npz", "npy", "csv", "parquet"]):
        out = tmp_path / f"f.{ext}"
        assert main(["extract", str(image_folder), "-o", str(out), "--cache-dir", str(cache), "--no-progress"]) == 0
        assert f"cache hits {0 if i == 0 else 24}" in capsys.readouterr().out
        outs[ext] = out
    z = np.load(outs["npz"])
    np.testing.assert_array_equal(np.load(outs["npy"]), z["features"])
    for ext in ("csv", "parquet"):
        df = pd.read_csv(outs[ext]) if ext == "csv" else pd.read_parquet(outs[ext])
        assert list(df.columns[:2]) == ["path", "pre_logits_0"] and df.shape == (24, 1281)
        assert df["path"].tolist() == z["paths"].tolist()
        np.testing.assert_allclose(df.iloc[:, 1:].to_numpy(np.float32), z["features"], rtol=1e-6)


def test_extract_from_list_file_and_glob(image_folder, tmp_path, capsys):
    lst = tmp_path / "paths.txt"
    files = sorted(str(p) for p in image_folder.rglob("*.png"))
    lst.write_text("# my list\n" + "\n".join(files) + "\n")
    assert main(["extract", str(lst), "-o", str(tmp_path / "a.npy"), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"{len(files)} images")
    assert main(["extract", f"{image_folder}/cat/*.jpg", "-o", str(tmp_path / "b.npy"), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("6 images")


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["extract", "/no/such/folder", "-o", "x.npy"], 1, "is not a folder"),
        (["extract", ".", "-o", "x.txt"], 1, "use a .npy, .npz, .csv or .parquet"),
        (["extract", "IMAGES", "-o", "x.npy", "--model", "resnet5O"], 1, "Did you mean 'resnet50'"),
        (["extract", "IMAGES", "-o", "x.npy", "--layers", "stage9"], 1, "layer 'stage9' not found"),
        (["extract", "BROKEN", "-o", "x.npy", "--on-error", "raise"], 1, "cannot load item 0"),
        (["extract", "IMAGES", "-o", "x.npy", "--batch-size", "0"], 2, "use a positive number of images"),
        (["extract", "IMAGES", "-o", "x.npy", "--layers", "stage9"], 1, "'featx layers efficientnet_lite0'"),
        (["extract", "IMAGES", "-o", "x.npy", "--model", "resnet18", "--weights", "none", "--layers", "layr4"], 1,
         "did you mean 'layer4' or 'layer3'"),
        (["cache", "prune"], 2, "--max-size"),
        (["cache", "prune", "--max-size", "lots"], 2, "invalid size"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_codes(args, code, message, image_folder, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_text("<html>")
    monkeypatch.chdir(tmp_path)
    args = [str(image_folder) if a == "IMAGES" else str(broken) if a == "BROKEN" else a for a in args]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code
    assert message in err
    assert "Traceback" not in err
    if code == 1:
        assert len(err.strip().splitlines()) == 1


def test_unreadable_image_exit_code_in_a_real_process(tmp_path):
    (tmp_path / "a.jpg").write_text("<html>")
    res = featx("extract", tmp_path, "-o", tmp_path / "x.npy", "--on-error", "raise")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"featx extract: error: cannot load item 0 ('{tmp_path / 'a.jpg'}'): not a recognised image format")


def test_debug_shows_traceback(tmp_path):
    res = featx("--debug", "extract", "/no/such/folder", "-o", tmp_path / "x.npy")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_cache_info_without_cache(tmp_path):
    res = featx("cache", "--cache-dir", tmp_path / "none", "info")
    assert res.returncode == 0 and "no featx cache" in res.stdout


@pytest.mark.parametrize("text,value", [("1048576", 1048576), ("500K", 500 * 1024), ("2M", 2 * 1024**2), ("1.5GiB", int(1.5 * 1024**3)), ("3gb", 3 * 1024**3)])
def test_parse_size(text, value):
    assert parse_size(text) == value


PNG = b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_report(image_folder, tmp_path):
    out = tmp_path / "report"
    res = featx("evaluate", image_folder, "--compare", "--cv", "3", "--classifiers", "logreg,rbf_svm",
                "-o", out, "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert "features         classifier" in res.stdout and "best: " in res.stdout
    for name in ("accuracy_by_layer.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == PNG
    import json

    data = json.loads((out / "results.json").read_text())
    assert data["class_names"] == ["cat", "dog", "fox"] and data["cv_folds"] == 3
    assert {r["features"] for r in data["rows"]} == {"pretrained", "random-init", "raw pixels"}
    assert len(data["confusion"]) == 3 and sum(map(sum, data["confusion"])) == 24
    # the workbench: learning curve (printed and drawn), per-class report, mistakes
    assert (out / "learning_curve.png").read_bytes()[:8] == PNG
    assert "images per class" in res.stdout and data["learning_curve"]["sentence"] in res.stdout
    assert "precision" in res.stdout and "recall" in res.stdout
    assert len(data["misclassified"]) == sum(sum(r) - r[i] for i, r in enumerate(data["confusion"]))
    if data["misclassified"]:
        assert (out / "misclassified.png").read_bytes()[:8] == PNG


def test_evaluate_with_tta_and_fine_tuning(image_folder, tmp_path, capsys):
    import json

    out = tmp_path / "report"
    assert main(["evaluate", str(image_folder), "--cv", "2", "--classifiers", "logreg", "--layers", "pre_logits",
                 "--tta", "hflip", "--finetune", "--finetune-epochs", "1", "-o", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert "tta hflip" in text and "fine-tuned" in text and "fit s" in text and "embedded: pretrained" in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["features"] for r in rows} == {"pretrained", "tta hflip", "fine-tuned"}
    tuned = next(r for r in rows if r["features"] == "fine-tuned")
    assert tuned["best_params"] == {"trainable_from": 1, "max_epochs": 1} and 0 <= tuned["mean"] <= 1
    assert all(r["fit_seconds"] > 0 for r in rows)


def test_extract_streams_npy_with_onnxruntime(image_folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    common = [str(image_folder), "--model", "resnet18", "--weights", "none", "--no-progress", "--precision", "fp32"]
    assert main(["extract", *common, "-o", str(a)]) == 0
    env = {"FEATX_CACHE_DIR": str(tmp_path / "c")}
    res = featx("extract", *common, "-o", b, "--backend", "onnxruntime", env_extra=env)
    assert res.returncode == 0, res.stderr
    fa, fb = np.load(a), np.load(b)
    assert fa.shape == (24, 512)
    np.testing.assert_allclose(fb, fa, rtol=1e-4, atol=1e-5 * np.abs(fa).max())
    assert list((tmp_path / "c" / "onnx").glob("*.onnx"))


def test_demo_pretrained_beats_random_init(tmp_path):
    out = tmp_path / "demo"
    res = featx("demo", "--n-per-class", "8", "--cv", "4", "--classifiers", "logreg", "-o", out,
                "--data", tmp_path / "data", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    import json

    rows = json.loads((out / "results.json").read_text())["rows"]
    best = {f: max(r["mean"] for r in rows if r["features"] == f) for f in ("pretrained", "random-init", "raw pixels")}
    assert best["pretrained"] > best["random-init"] + 0.1 and best["pretrained"] > best["raw pixels"] + 0.1, best
    assert (out / "accuracy_by_layer.png").read_bytes()[:8] == PNG
    data = json.loads((out / "results.json").read_text())
    assert data["transfer_note"] == "" and "negative transfer" not in res.stdout  # pretrained clearly wins here


def test_evaluate_errors(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jpg").write_bytes(b"")
    assert main(["evaluate", str(tmp_path)]) == 1
    assert "at least two" in capsys.readouterr().err


def test_errors_speak_the_command_lines_language(image_folder, tmp_path, capsys):
    assert main(["extract", str(image_folder), "-o", str(tmp_path / "x.npy"), "--model", "resnet18",
                 "--weights", "none", "--layers", "layr4"]) == 1
    err = capsys.readouterr().err
    assert "featx.list_layers" not in err and "'featx layers resnet18'" in err
    assert "stage1, stage2" in err and "layer4.0.conv1" not in err  # aliases, not forty module names


def test_offline_weights_error_names_flags_and_keeps_the_command_runnable(image_folder, tmp_path, capsys, monkeypatch):
    """The offline error through the CLI: its prose in flags, its quoted command valid Python (it once read
    ``get_model('resnet50', --weights IMAGENET1K_V2)``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a loopback proxy would pass the session's network guard
    assert main(["extract", str(image_folder), "-o", str(tmp_path / "x.npy"), "--model", "resnet50"]) == 1
    err = capsys.readouterr().err
    assert "get_model('resnet50', weights='IMAGENET1K_V2')" in err  # the command stays Python that runs
    assert "--weights none for random initialisation" in err and "--model efficientnet_lite0" in err
    assert "weights=None" not in err and "model='efficientnet_lite0'" not in err


def test_parameter_errors_carry_their_parameter():
    import pickle

    from featx import ParameterError, PretrainedFeatureExtractor

    with pytest.raises(ParameterError) as info:
        PretrainedFeatureExtractor(weights=None, device="gpu").fit()
    err = info.value
    assert isinstance(err, ValueError) and err.param == "device"
    assert str(err).startswith("device='gpu' is not a valid device")  # Python's spelling in Python
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.param == "device" and again.parts == err.parts


def test_the_cli_rewrites_no_prose():
    """Only parts a featx error marks as parameters become flags: other text is printed as it is."""
    import argparse

    from featx.cli import _cli_message

    args = argparse.Namespace(command="extract", model="resnet50", weights="DEFAULT")
    text = "a library said weights=None and model='x'; see featx.list_layers(model)"
    assert _cli_message(ValueError(text), args) == text


@pytest.mark.parametrize(
    "argv,wanted,unwanted",
    [
        (["layers", "resnet5O"], ["Did you mean 'resnet50'", "'resnet5O' is not a known model"],
         ["--model", "torch.nn.Module", "model="]),
        (["layers", "vit_tiny_patch16_224", "--weights", "none", "--input-size", "384"], ["pass --input-size PIXELS"],
         ["preprocess=", "input_size"]),
        (["extract", "IMAGES", "-o", "OUT", "--weights", "foo"],
         ["--weights foo is invalid for --model efficientnet_lite0", "Use --weights DEFAULT", "--weights none"],
         ["weights=", "model="]),
        (["extract", "IMAGES", "-o", "OUT", "--backend", "onnxruntime", "--precision", "bf16"],
         ["--backend onnxruntime computes in fp32; use --precision fp32"], ["backend=", "precision="]),
        (["extract", "IMAGES", "-o", "OUT", "--device", "cuda:7"], ["--device cuda:7"], ["device="]),
        (["extract", "IMAGES", "-o", "OUT", "--pooling", "flatten", "--tta", "hflip"],
         ["--tta hflip averages", "--pooling flatten", "Use --pooling avg"], ["tta=", "pooling="]),
    ],
)
def test_every_error_speaks_in_flags(argv, wanted, unwanted, image_folder, tmp_path, capsys):
    import torch

    if argv[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a CUDA device 7")
    argv = [str(image_folder) if a == "IMAGES" else str(tmp_path / "x.npy") if a == "OUT" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    for text in wanted:
        assert text in err
    for text in unwanted:
        assert text not in err


def _folder_with_a_broken_image(image_folder, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(image_folder, root)
    (root / "cat" / "zz_broken.jpg").write_text("<html>")
    return root


@pytest.mark.parametrize("on_error", [None, "nan", "skip"])
def test_extract_survives_a_broken_image(image_folder, tmp_path, capsys, on_error):
    root = _folder_with_a_broken_image(image_folder, tmp_path)
    out = tmp_path / "f.npy"
    extra = [] if on_error is None else ["--on-error", on_error]
    assert main(["extract", str(root), "-o", str(out), "--no-progress", "--precision", "fp32", *extra]) == 0
    cap = capsys.readouterr()
    assert "1 of 25 images could not be read" in cap.err and "zz_broken.jpg: not a recognised image format" in cap.err
    feats = np.load(out)
    listed = (tmp_path / "f.paths.txt").read_text().splitlines()
    assert len(listed) == feats.shape[0] and "f.paths.txt" in cap.out
    if on_error == "skip":
        assert feats.shape[0] == 24 and not np.isnan(feats).any() and not any("zz_broken" in p for p in listed)
    else:  # the default: a NaN row where the broken file is, so rows stay aligned with the paths
        bad = [i for i, p in enumerate(listed) if p.endswith("zz_broken.jpg")]
        assert feats.shape[0] == 25 and np.isnan(feats[bad]).all() and not np.isnan(np.delete(feats, bad, 0)).any()


def test_extract_npz_records_paths_and_tta(image_folder, tmp_path, capsys):
    out, tta = tmp_path / "f.npz", tmp_path / "t.npz"
    assert main(["extract", str(image_folder), "-o", str(out), "--no-progress", "--precision", "fp32"]) == 0
    assert main(["extract", str(image_folder), "-o", str(tta), "--no-progress", "--precision", "fp32",
                 "--tta", "hflip"]) == 0
    a, b = np.load(out), np.load(tta)
    assert a["features"].shape == b["features"].shape and not np.allclose(a["features"], b["features"])
    assert a["paths"].tolist() == b["paths"].tolist()


def test_evaluate_skips_a_broken_image(image_folder, tmp_path, capsys):
    root = _folder_with_a_broken_image(image_folder, tmp_path)
    rc = main(["evaluate", str(root), "--classifiers", "logreg", "--cv", "3", "--no-cache", "--precision", "fp32",
               "-o", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped 1 of 25 images" in out and "zz_broken.jpg" in out
    assert main(["evaluate", str(root), "--classifiers", "logreg", "--cv", "3", "--no-cache", "--on-error", "raise",
                 "-o", str(tmp_path / "report")]) == 1
    assert "zz_broken.jpg" in capsys.readouterr().err


def test_options_in_any_position(image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["extract", str(image_folder), "-o", str(tmp_path / "x.npz"), "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    capsys.readouterr()
    for argv in (["cache", "info", "--cache-dir", str(cache)], ["cache", "--cache-dir", str(cache), "info"],
                 ["--debug", "cache", "info", "--cache-dir", str(cache)]):
        assert main(argv) == 0
        assert "images=24" in capsys.readouterr().out, argv
    for argv in (["extract", "/no/such/folder", "-o", "x.npy", "--debug"], ["--debug", "extract", "/no/such", "-o", "x.npy"]):
        with pytest.raises(Exception, match="is not a folder"):  # --debug: the real exception, not a one-line message
            main(argv)
    assert main(["extract", "/no/such/folder", "-o", "x.npy"]) == 1


def test_cache_commands_cover_exported_graphs(image_folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cache = tmp_path / "cache"
    common = ["--model", "resnet18", "--weights", "none", "--no-progress", "--cache-dir", str(cache)]
    assert main(["extract", str(image_folder), "-o", str(tmp_path / "a.npz"), "--backend", "onnxruntime", *common]) == 0
    assert main(["extract", str(image_folder), "-o", str(tmp_path / "b.npz"), "--tta", "hflip", *common]) == 0
    (graph,) = (cache / "onnx").glob("*.onnx")
    assert graph.stat().st_mode & 0o044  # readable by others (mkstemp's 0600 hid it), as the database is
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    info = capsys.readouterr().out
    size_line = next(line for line in info.splitlines() if line.startswith("size"))
    assert "1 exported graph" in size_line
    graph_mib = graph.stat().st_size / 2**20
    assert float(size_line.split()[1]) >= graph_mib * 0.99  # the total counts the graph
    assert "tta=hflip" in info and info.count("torchvision:resnet18") == 2
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "1 exported graph" in capsys.readouterr().out and not list((cache / "onnx").glob("*.onnx"))
    # exported again (the cleared cache computes again), then pruned: graphs go first
    assert main(["extract", str(image_folder), "-o", str(tmp_path / "a.npz"), "--backend", "onnxruntime", *common]) == 0
    (graph,) = (cache / "onnx").glob("*.onnx")
    db = (cache / "featx-cache.sqlite").stat().st_size
    assert main(["cache", "prune", "--max-size", str(db + graph.stat().st_size // 2), "--cache-dir", str(cache)]) == 0
    assert not graph.exists() and "evicted 0 " in capsys.readouterr().out  # the graph went, the entries stayed


def test_demo_leaves_no_temporary_folder(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = featx("demo", "--n-per-class", "4", "--cv", "2", "--classifiers", "logreg", "--no-compare", "-o",
                tmp_path / "out", "--cache-dir", tmp_path / "cache", env_extra={"TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stderr
    assert "removed afterwards" in res.stdout and list(tmp.iterdir()) == []


def test_layers_channels_of_token_outputs(capsys):
    """A ViT block outputs (tokens, C): the channels column is C (what pooling gives), not the token count."""
    assert main(["layers", "vit_tiny_patch16_224", "--weights", "none"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    block = rows["blocks.0"]
    assert block.split()[1:3] == ["block1", "192"] and block.endswith("(197, 192)  tokens, 1 prefix"), block
    assert rows["patch_embed"].endswith("(196, 192)  tokens"), rows["patch_embed"]  # no class token there yet


def test_evaluate_a_vision_transformer_with_token_pooling(image_folder, tmp_path, capsys):
    """`featx evaluate --model <ViT>`: the default candidates are its last two blocks and pre_logits."""
    rc = main(["evaluate", str(image_folder), "--model", "vit_tiny_patch16_224", "--weights", "none",
               "--pooling", "cls+avg", "--classifiers", "logreg", "--cv", "2", "--no-cache", "--precision", "fp32",
               "-o", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "random-init: 24 images embedded" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("random-init ")]
    assert [r[2] for r in rows] == ["block11", "block12", "pre_logits"]
    import json

    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["layers"] == ["block11", "block12", "pre_logits"]


def test_extract_takes_token_poolings(image_folder, tmp_path):
    out = tmp_path / "f.npz"
    assert main(["extract", str(image_folder), "-o", str(out), "--model", "vit_tiny_patch16_224", "--weights", "none",
                 "--layers", "block12", "--pooling", "cls+avg", "--no-progress", "--precision", "fp32"]) == 0
    import numpy as np

    data = np.load(out)
    assert data["features"].shape == (24, 2 * 192)
    assert list(data["feature_names"][[0, 192]]) == ["block12_cls_0", "block12_avg_0"]


def test_every_argument_of_every_command_has_help_text():
    import argparse

    from featx.cli import build_parser

    missing, seen = [], set()

    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if id(sub) not in seen:
                        seen.add(id(sub))
                        walk(sub, f"{where} {name}")
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                missing.append(f"{where}: {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "featx")
    assert len(seen) >= 6  # layers, extract, evaluate, demo, cache and its sub-commands
    assert missing == []


def test_extract_reads_every_band_with_in_chans(tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    for i in range(3):
        tifffile.imwrite(tmp_path / f"scene{i}.tif", rng.integers(0, 256, (40, 44, 5), dtype=np.uint8),
                         photometric="minisblack")
    out = tmp_path / "f.npz"
    assert main(["extract", str(tmp_path), "-o", str(out), "--model", "resnet18", "--weights", "none",
                 "--in-chans", "5", "--no-progress"]) == 0
    assert np.load(out)["features"].shape == (3, 512)
    assert main(["extract", str(tmp_path), "-o", str(out), "--in-chans", "0"]) == 1
    assert "--in-chans 0 is invalid" in capsys.readouterr().err
