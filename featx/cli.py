"""The ``featx`` command: inspect layers, extract features, evaluate a folder, run the demo, manage the cache.

Exit codes: 0 on success, 2 on usage errors, 1 on a runtime error (bad path,
unknown model, unreadable image), reported as one line unless ``--debug``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ._outputs import check_writable, path_line, read_path_lines, written
from ._options import BACKENDS, DEFAULT_MODEL, POOLINGS, PRECISIONS, TTA_MODES

__all__ = ["main", "parse_size"]

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``"500M"``, ``"1.5GiB"``, ``"200kB"``, ``"1048576"`` -> bytes (binary multiples)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 500M, 2G, 1.5GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _CliError(Exception):
    """A runtime error shown as one line (exit code 1)."""


# arguments given by position, not by flag, in a command
_POSITIONAL = {("layers", "model")}


def _cli_message(exc: BaseException, args: argparse.Namespace) -> str:
    """An error's first line in the command line's terms.

    featx's parameter errors carry the parameters they name as parts of the
    message; each becomes this command's flag (``weights=None`` -> ``--weights
    none``), or stays Python where the command has no such flag. Other
    messages are printed as they are: no prose is rewritten.
    """
    from ._exceptions import ModelLoadError, ParameterError

    if not isinstance(exc, (ParameterError, ModelLoadError)):
        text = str(exc)
    else:
        text = exc.render(lambda part: _cli_part(part, args))
    return text.splitlines()[0] if text else type(exc).__name__


def _cli_part(part: list, args: argparse.Namespace) -> str:
    """``["arg", name, python, cli]`` or ``["alt", python, cli]`` as this command says it."""
    model = getattr(args, "model", None) or "MODEL"
    if part[0] == "alt":
        return part[2].format(model=model)
    _, name, python, value = part
    if isinstance(value, dict):  # preprocess={'input_size': ...}: one flag per key, if the command has them all
        if all(key in vars(args) for key in value):
            return " ".join(_flag(key, v) for key, v in value.items())
        return f"{name}={python}"
    if (args.command, name) in _POSITIONAL:
        return repr(value) if value is not None else name.upper()
    return _flag(name, value) if name in vars(args) else f"{name}={python}"


_METAVARS = {"input_size": "PIXELS"}  # a placeholder's word where the name's capitals would read badly


def _flag(name: str, value: str | None) -> str:
    shown = value if value is not None else _METAVARS.get(name, name.upper())
    return f"--{name.replace('_', '-')} {shown}"


# ------------------------------------------------------------------- layers


def _cmd_layers(args: argparse.Namespace) -> int:
    from ._inspect import list_layers

    pre = {"input_size": args.input_size} if args.input_size else None
    rows = list_layers(args.model, weights=None, preprocess=pre)
    if not args.all:
        rows = [r for r in rows if r.alias is not None or r.name.count(".") <= 1]
    width = max(len(r.name) for r in rows)
    print(f"{'layer':<{width}}  {'alias':<10}  {'channels':>8}  output shape")
    for r in rows:
        note = {"nhwc": "  (H, W, C)", "tokens": f"  tokens, {r.prefix} prefix" if r.prefix else "  tokens"}
        print(f"{r.name:<{width}}  {r.alias or '':<10}  {r.channels:>8}  {tuple(r.shape)}{note.get(r.layout, '')}")
    return 0


# ------------------------------------------------------------------ extract


def _sources(source: str) -> list[str]:
    from .datasets import find_images

    p = Path(source)
    if p.is_dir():
        found = find_images(p)
    elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):  # one path per line, as featx writes them
        found = [line for line in read_path_lines(p.read_text(encoding="utf-8"))
                 if line.strip() and not line.startswith("#")]
    elif any(ch in source for ch in "*?["):
        found = sorted(glob.glob(source, recursive=True))
    elif p.is_file():
        found = [str(p)]
    else:
        raise _CliError(f"{source!r} is not a folder, a text file of paths, an image or a glob that matches files")
    if not found:
        raise _CliError(f"no images found in {source!r}")
    return found


def _utf8(p: str) -> bool:
    try:
        p.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _write_features(path: Path, feats, paths: list[str], names) -> None:
    """Write ``path`` whole or not at all; file names are written as the bytes they are.

    ``.csv``: names that are not UTF-8 keep their own bytes (read them back
    with ``encoding_errors="surrogateescape"`` and an object ``path`` column); ``.parquet``: the path
    column is binary (the names' bytes) when any name is not UTF-8, text
    otherwise; ``.npz``: a unicode array, undecodable bytes as lone surrogates (``os.fsencode`` restores them).
    """
    import numpy as np

    suffix = path.suffix.lower()
    with written(path) as tmp:
        if suffix == ".npz":
            np.savez(tmp, features=feats, paths=np.asarray(paths, dtype=str), feature_names=np.asarray(names, dtype=str))
            return
        import pandas as pd

        df = pd.DataFrame(feats, columns=list(names))
        if suffix == ".csv":
            df.insert(0, "path", pd.Series(paths, dtype=object))  # object: pandas' arrow strings refuse such names
            df.to_csv(tmp, index=False, errors="surrogateescape")
        else:
            df.insert(0, "path", paths if all(map(_utf8, paths)) else [os.fsencode(p) for p in paths])
            df.to_parquet(tmp, index=False)


def _cmd_extract(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np

    from ._exceptions import ImageLoadWarning
    from ._extractor import PretrainedFeatureExtractor

    out = Path(args.output)
    if out.suffix.lower() not in (".npy", ".npz", ".csv", ".parquet"):
        raise _CliError(f"output {str(out)!r}: use a .npy, .npz, .csv or .parquet file name")
    side = out.with_name(out.stem + ".paths.txt")
    for target in (out, side) if out.suffix.lower() == ".npy" else (out,):
        check_writable(target)  # before any image is computed
    paths = _sources(args.source)
    weights = _weights(args.weights)
    layers = args.layers.split(",") if args.layers else None
    cache = args.cache_dir if args.cache_dir else (True if args.cache else None)
    ext = PretrainedFeatureExtractor(
        args.model, weights=weights, layers=layers, pooling=args.pooling, device=args.device,
        precision=args.precision, batch_size=args.batch_size or "auto", cache=cache,
        progress=False if args.no_progress else None, backend=args.backend, tta=args.tta,
        on_error="raise" if args.on_error == "raise" else "nan", in_chans=args.in_chans,
    )
    start = time.perf_counter()
    ext.fit(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageLoadWarning)  # reported below, one line per file
        if out.suffix.lower() == ".npy":  # streamed into a memory-mapped file: any number of images
            feats = ext.transform_to_npy(paths, out)
        else:
            feats = ext.transform(paths)
    failed = {int(i) for i in ext.failed_indices_}
    kept = paths
    if failed and args.on_error == "skip":
        keep = [i for i in range(len(paths)) if i not in failed]
        kept, feats = [paths[i] for i in keep], feats[keep]
        if out.suffix.lower() == ".npy":
            with written(out) as tmp:
                np.save(tmp, feats)
    if out.suffix.lower() == ".npy":
        with written(side) as tmp:  # one path per line; a name with a line break as a JSON string
            tmp.write_text("".join(path_line(p) for p in kept), encoding="utf-8")
    else:
        _write_features(out, feats, kept, ext.get_feature_names_out())
    seconds = time.perf_counter() - start
    stats = ext.last_run_
    print(f"{len(kept)} images, {feats.shape[1]} features, {seconds:.1f} s, "
          f"{len(paths) / max(seconds, 1e-9):.1f} images/s, cache hits {stats.cache_hits} -> {out}")
    if out.suffix.lower() == ".npy":
        print(f"row i of {out.name} is line i of {side}")
    if failed:
        what = "skipped" if args.on_error == "skip" else "NaN rows"
        print(f"{len(failed)} of {len(paths)} images could not be read ({what}):", file=sys.stderr)
        for i, reason in ext.failed_reasons_:
            print(f"  {paths[i]}: {reason}", file=sys.stderr)
    streams = stats.streams if stats.computed else ext.streams_  # an fp32 schedule measured in this run
    print(f"computed on {ext.device_} in {ext.precision_} with {ext.backend_}"
          + (f", {streams} single-threaded streams" if streams > 1 else ""))
    return 0


# the cache key spells a precision as str(dtype); the CLI speaks its own option values
_PRECISION_SHOWN = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}

# ----------------------------------------------------------- evaluate, demo


def _run_evaluation(folder, args: argparse.Namespace, compare: bool) -> int:
    from .evaluate import evaluate_folder, format_report, format_table, write_report

    if not Path(folder).is_dir():
        raise _CliError(f"{str(folder)!r} is not a folder (expected one sub-folder per class)")
    cache = None if args.no_cache else (args.cache_dir or True)
    start = time.perf_counter()
    result = evaluate_folder(
        folder, model=args.model, weights=_weights(args.weights), pooling=args.pooling,
        layers=args.layers.split(",") if args.layers else None,
        classifiers=tuple(args.classifiers.split(",")), compare=compare, cv=args.cv, cache=cache,
        device=args.device, precision=args.precision, on_error=args.on_error,
        log=lambda line: print(line, flush=True), tta=args.tta,
        finetune=args.finetune,
        finetune_params={"max_epochs": args.finetune_epochs, "trainable_from": args.trainable_from},
        save=args.save, nested=not args.no_nested, learning_curve=not args.no_learning_curve,
    )
    print()
    print(format_table(result))
    b = result.best
    print(f"\nbest: {b['classifier']} on {b['layer']}: {b['mean']:.3f} ± {b['std']:.3f} "
          f"({result.cv_folds}-fold CV, {result.n_images} images, {len(result.class_names)} classes, "
          f"chance {1 / len(result.class_names):.3f})")
    report = format_report(result)
    if report:
        print(f"\n{report}")
    for path in write_report(result, args.out):
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    return _run_evaluation(args.folder, args, compare=args.compare)


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from .datasets import DEMO_SOURCES, make_demo_folder

    with tempfile.TemporaryDirectory(prefix="featx-demo-") as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        make_demo_folder(data, n_per_class=args.n_per_class, size=args.size)
        where = f"in {data}" if args.data else "in a temporary folder (removed afterwards; keep it with --data DIR)"
        print(f"demo data: {args.n_per_class} patches of {args.size} x {args.size} px from each of "
              f"{len(DEMO_SOURCES)} images bundled with scikit-image ({', '.join(DEMO_SOURCES)}) {where}")
        return _run_evaluation(data, args, compare=not args.no_compare)


def _weights(value: str) -> str | None:
    """``--weights none`` is random init (``weights=None``)."""
    return None if value in ("none", "None") else value


def _int_or_str(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _add_eval_options(p: argparse.ArgumentParser, out_default: str) -> None:
    from .evaluate import CLASSIFIERS

    p.add_argument("--model", default=DEFAULT_MODEL, help=_MODEL_HELP)
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, a weights name, none, or a checkpoint path")
    p.add_argument("--layers", help="comma-separated candidate layers (default: the last two stages, or blocks of a "
                                    "transformer, and pre_logits)")
    p.add_argument("--pooling", default="avg", choices=list(POOLINGS),
                   help="pooling of every candidate layer (token layers: cls, cls+avg too)")
    p.add_argument("--classifiers", default=",".join(CLASSIFIERS), help=f"comma-separated, from {','.join(CLASSIFIERS)}")
    p.add_argument("--cv", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("-o", "--out", default=out_default, help=f"report folder (default {out_default})")
    p.add_argument("--cache-dir", help="embedding cache directory or storage URL (default: $FEATX_CACHE_DIR or "
                                       "~/.cache/featx)")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--no-nested", action="store_true",
                   help="skip the nested cross-validation of the whole selection (the honest accuracy estimate)")
    p.add_argument("--no-learning-curve", action="store_true",
                   help="skip the learning curve (accuracy against labelled images per class)")
    p.add_argument("--tta", choices=list(TTA_MODES), help="also evaluate features averaged over test-time augmentation views")
    p.add_argument("--on-error", default="skip", choices=["raise", "skip"],
                   help="an unreadable image: skip (default: left out and reported) or raise (stop with an error)")
    p.add_argument("--finetune", action="store_true",
                   help="also cross-validate a fine-tuned classifier (FineTunedClassifier; slow on a CPU)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--save", metavar="FILE.skops",
                   help="write the best pipeline (extractor + classifier, fitted on every image) to a skops file; "
                        "load it with skops.io.load(FILE, trusted=featx.trusted_types())")
    p.add_argument("--trainable-from", type=_int_or_str, default=1,
                   help="stages trained by --finetune: a number of final stages, or a layer name (default 1)")
    _add_compute_options(p)


def _add_compute_options(p: argparse.ArgumentParser) -> None:

    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="auto: bf16 on GPUs and on CPUs with native bf16 (AVX512_BF16/AMX), else fp32; "
                        "int8: CPU only, quantised and compiled once per cache (pip install 'featx[int8]')")


# -------------------------------------------------------------------- cache


def _open_cache(args: argparse.Namespace):
    """``(store or None, artifact directory or None, where)``: the store as the protocol, whatever its kind."""
    from ._cache.sqlite import DB_NAME, EmbeddingCache, resolve_cache_dir
    from ._runtime.engines import artifacts
    from ._cache.objects import SharedCache, check_url, is_url

    if is_url(args.cache_dir):  # a shared store: managed as it is, without a local layer (and no artifacts)
        try:
            url = check_url(args.cache_dir)
        except ValueError as exc:
            raise _CliError(str(exc)) from None
        return SharedCache(url, local=None), None, url
    root = Path(args.cache_dir) if args.cache_dir else resolve_cache_dir(True)
    if not (root / DB_NAME).exists() and not artifacts(root):
        return None, None, str(root)
    return EmbeddingCache.open(root), root, str(root)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _print_info(info: dict, graphs: list) -> None:
    from ._runtime.engines import artifact_bytes

    parts = [f"{name} {_human(size)}" for name, size in info["parts"].items()]
    if graphs:
        parts.append(f"{_plural(len(graphs), 'exported graph')} {_human(artifact_bytes(graphs))}")
    total = info["size_bytes"] + artifact_bytes(graphs)
    print(f"cache      {info['path']} ({info['kind']})")
    print(f"size       {_human(total)} ({', '.join(parts)})")
    indexed = "" if info["files_indexed"] is None else f"; {info['files_indexed']} files indexed"
    print(f"entries    {info['entries']} in {len(info['namespaces'])} namespace(s){indexed}")
    for ns in info["namespaces"]:
        prov = ns["provenance"]
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(ns["last_used"])) if ns["last_used"] else "never"
        tta = f"  tta={prov['tta']}" if prov.get("tta") else ""
        print(f"- {prov['model']}  weights={prov.get('weights')}{tta}  images={ns['images']}  entries={ns['entries']}  "
              f"vectors={_human(ns['vector_bytes'])}  last used {used}")
        print(f"    namespace {ns['namespace']}: featx {prov.get('featx')}, torch {prov.get('torch_full')}, "
              f"{'/'.join(prov.get('library_full') or ['-'])}, precision {_PRECISION_SHOWN.get(prov.get('precision'), prov.get('precision'))}, "
              f"input {prov['preprocess'].get('input_size')}")


def _cmd_cache(args: argparse.Namespace) -> int:
    from ._runtime.engines import artifact_bytes, artifacts, clear_artifacts, prune_artifacts

    cache, root, where = _open_cache(args)
    if cache is None:
        print(f"no featx cache at {where}")
        return 0
    graphs = artifacts(root) if root is not None else []
    if args.cache_cmd == "info":
        _print_info(cache.info(), graphs)
    elif args.cache_cmd == "clear":
        entries = cache.clear()
        removed = clear_artifacts(root) if root is not None else 0
        print(f"removed {entries} entries and {_plural(removed, 'exported graph')} from {where}")
    elif args.cache_cmd == "prune":
        entries_bytes = cache.info()["size_bytes"]
        before = entries_bytes + artifact_bytes(graphs)
        dropped, left = prune_artifacts(root, args.max_size, entries_bytes) if root else (0, 0)
        removed = cache.prune(args.max_size - left)
        after = cache.info()["size_bytes"] + left
        dropped_text = f" and {_plural(dropped, 'exported graph')}" if dropped else ""
        print(f"evicted {removed} {cache.eviction} entries{dropped_text}: {_human(before)} -> {_human(after)} "
              f"(limit {_human(args.max_size)})")
    return 0


# --------------------------------------------------------------------- main


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use a positive number of images (or leave it "
                                         "out for the automatic choice)")
    return value


def _debug_parent(top: bool) -> argparse.ArgumentParser:
    """``--debug``, accepted before and after the command (SUPPRESS: a later parser keeps an earlier True)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show full tracebacks on errors")
    return p


def _cache_dir_parent(top: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--cache-dir", default=None if top else argparse.SUPPRESS,
                   help="cache directory or storage URL (s3://bucket/prefix, ...; default: $FEATX_CACHE_DIR or the "
                        "user cache directory)")
    return p


_MODEL_HELP = ("backbone: efficientnet_lite0 (offline default), a torchvision or timm name (e.g. resnet50, "
               "timm:convnext_tiny; needs downloaded weights), or a checkpoint via --weights")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    debug = _debug_parent(top=False)
    parser = argparse.ArgumentParser(prog="featx", description="Pretrained CNN and vision-transformer features for scikit-learn.",
                                     parents=[_debug_parent(top=True)])
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_layers_command(sub, debug)
    _add_extract_command(sub, debug)
    _add_evaluate_command(sub, debug)
    _add_demo_command(sub, debug)
    _add_cache_command(sub, debug)
    return parser


def _add_layers_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser("layers", help="list a model's selectable layers with output shapes", parents=[debug],
                       description="List the layers PretrainedFeatureExtractor(layers=...) accepts, with output shapes.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    p.add_argument("--input-size", type=int, help="input size in pixels (default: the model's own)")
    p.add_argument("--all", action="store_true", help="every module, not only stages and top-level blocks")
    p.add_argument("--weights", help="accepted as in extract, and not needed: the layers and their shapes do not "
                   "depend on the weights, so nothing is ever downloaded to list them")
    p.set_defaults(func=_cmd_layers)


def _add_extract_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser("extract", help="embed images into a feature file", parents=[debug],
                       description="Embed the images of SOURCE (a folder, searched recursively; a text file of "
                                   "paths; or a glob) and write the features to OUT (.npy, .npz, .csv, .parquet). "
                                   "An image that cannot be read does not stop the run: see --on-error.")
    p.add_argument("source", help="a folder of images (searched recursively), a text file of paths (one per "
                                   "line), or a quoted glob such as 'photos/*.jpg'")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .npy (paths in OUT.paths.txt beside it), .npz (features + paths), .csv or "
                        ".parquet (a path column first)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=_MODEL_HELP)
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, a weights name, none, or a checkpoint path")
    p.add_argument("--layers", help="comma-separated layer names or aliases (default: pre_logits)")
    p.add_argument("--pooling", default="avg", choices=list(POOLINGS),
                   help="how each layer's feature map becomes a vector (default: avg)")
    _add_compute_options(p)
    p.add_argument("--batch-size", type=_positive_int, help="images per forward pass (default: automatic)")
    p.add_argument("--in-chans", type=int, default=3,
                   help="input channels (default 3, RGB): 1 reads images as grayscale, N reads every band of N-band "
                        "TIFFs; the backbone's first convolution is adapted from its RGB weights")
    p.add_argument("--cache", action="store_true", help="use the default cache ($FEATX_CACHE_DIR or ~/.cache/featx)")
    p.add_argument("--cache-dir", help="use a cache in this directory, or in a shared store (s3://bucket/prefix, ...)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="inference backend (default: auto, a graph compiled once a job is large enough to pay for "
                        "it where the CPU computes in fp32, eager torch elsewhere; onnxruntime needs featx[onnx])")
    p.add_argument("--tta", choices=list(TTA_MODES), help="average features over test-time augmentation views")
    p.add_argument("--on-error", default="nan", choices=["raise", "nan", "skip"],
                   help="an unreadable image: nan (default: a NaN row, listed on stderr), skip (no row; listed), "
                        "or raise (stop with an error)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.set_defaults(func=_cmd_extract)


def _add_evaluate_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", help="cross-validate classifiers x layers on a folder of labelled photos",
                       parents=[debug],
                       description="How well does transfer learning work on FOLDER (one sub-folder per class)? "
                                   "Embeds each image once (cached), runs GridSearchCV for each classifier x layer, "
                                   "prints a table and writes a report folder (JSON, accuracy-per-layer plot, "
                                   "confusion matrix of the best model).")
    p.add_argument("folder", help="a folder with one sub-folder of images per class")
    p.add_argument("--compare", action="store_true", help="also evaluate a random-init backbone and raw pixels")
    _add_eval_options(p, "featx-report")
    p.set_defaults(func=_cmd_evaluate)


def _add_demo_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="run evaluate on a small real image set that needs no download", parents=[debug],
                       description="Run 'featx evaluate --compare' on patches of photographs bundled with "
                                   "scikit-image, one class per photograph, with the offline default backbone.")
    p.add_argument("--data", help="where to write the demo images (default: a temporary folder, removed afterwards)")
    p.add_argument("--n-per-class", type=int, default=20, help="images per class (default 20)")
    p.add_argument("--size", type=int, default=64, help="patch size in pixels (default 64)")
    p.add_argument("--no-compare", action="store_true", help="skip the random-init and raw-pixel baselines")
    _add_eval_options(p, "featx-demo-report")
    p.set_defaults(func=_cmd_demo)


def _add_cache_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    cache_dir = _cache_dir_parent(top=False)
    p = sub.add_parser("cache", help="inspect and manage the embedding cache", parents=[debug, _cache_dir_parent(True)],
                       description="Inspect and manage the embedding cache (embeddings, exported and compiled graphs).")
    csub = p.add_subparsers(dest="cache_cmd", required=True, metavar="ACTION")
    csub.add_parser("info", help="size, entries and a per-model breakdown with provenance", parents=[debug, cache_dir],
                    description="Show the cache's size, entries and a per-model breakdown with provenance.")
    csub.add_parser("clear", help="delete every entry", parents=[debug, cache_dir],
                    description="Delete every cache entry and exported graph.")
    pr = csub.add_parser("prune", help="evict least-recently-used entries down to a size", parents=[debug, cache_dir],
                         description="Evict exported graphs, then least-recently-used entries, until the cache is "
                                     "at most --max-size.")
    pr.add_argument("--max-size", type=parse_size, required=True, help="e.g. 500M, 2G")
    p.set_defaults(func=_cmd_cache)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (_CliError, ValueError, RuntimeError, OSError, ImportError) as exc:
        if args.debug:
            raise
        print(f"featx {args.command}: error: {_cli_message(exc, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
