"""The low-data workbench of `featx evaluate`: honest accuracy, learning curves, mistakes, negative transfer.

Most tests run on synthetic features (no backbone): the properties are about
the statistics, and a feature set built by hand has a known answer.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from featx._workbench.learning import (LADDER, curve_sentence, learning_curve_of, per_class_sizes,
                                        stratified_prefix_splits)
from featx._workbench.mistakes import SHEET_MAX, contact_sheet, error_analysis, format_errors
from featx._workbench.transfer import transfer_note
from featx.evaluate import (CLASSIFIERS, LOW_DATA, _classifiers, _first_of_the_best, _nested, _search,
                            evaluate_folder, format_learning_curve, format_report, write_report)


def _feature_set(blocks: dict[str, np.ndarray], label: str = "pretrained"):
    """A feature set as evaluate_folder's: columns named ``<layer>_<i>``, one layer per block."""
    names = np.array([f"{layer}_{i}" for layer, b in blocks.items() for i in range(b.shape[1])])
    return label, np.hstack(list(blocks.values())).astype(np.float32), names, list(blocks)


def _result(n: int):
    from featx.evaluate import EvalResult

    return EvalResult("", n, [], "", [], 5)


# ------------------------------------------------------------------ honest accuracy (nested CV)


def test_nested_estimate_finds_the_known_accuracy_of_a_layer_built_to_win():
    """Layer "signal" separates the classes up to 15% flipped labels: the best any classifier can do is 0.85."""
    rng = np.random.default_rng(0)
    n = 300
    truth = rng.integers(0, 2, n)
    flip = rng.permutation(n) < int(0.15 * n)
    y = np.where(flip, 1 - truth, truth)
    signal = np.c_[(2 * truth - 1) * 3.0 + rng.normal(0, 0.3, n), rng.normal(size=(n, 4))]
    fs = [_feature_set({"noise": rng.normal(size=(n, 5)), "signal": signal})]
    splitter = StratifiedKFold(5, shuffle=True, random_state=0)
    nested = _nested(fs, ("logreg", "centroid"), y, splitter, 5)
    assert abs(nested["mean"] - 0.85) <= nested["std"], nested
    assert all(s["layer"] == "signal" for s in nested["selections"])


def test_on_pure_noise_labels_nested_stays_near_chance_while_the_best_row_rises_above_it():
    """Why nested CV is there: the maximum of many cross-validated means on the same folds is optimistic.

    Noise labels, 32 candidate rows (16 noise layers x 2 classifiers), 40
    images; averaged over four data sets, as one is noisy at this size.
    """
    best, nested = [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        n = 40
        y = np.repeat([0, 1], n // 2)
        fs = [_feature_set({f"l{k}": rng.normal(size=(n, 10)) for k in range(16)})]
        splitter = StratifiedKFold(5, shuffle=True, random_state=0)
        classifiers = ("centroid", "knn")  # the cheap ones: the property is the selection's, not theirs
        rows = _search(fs, classifiers, y, splitter, "pretrained", _result(n))
        assert len(rows) == 32
        best.append(_first_of_the_best(rows, n)[0].mean)
        nested.append(_nested(fs, classifiers, y, splitter, 5)["mean"])
    assert all(b > m for b, m in zip(best, nested)), (best, nested)
    assert np.mean(best) >= 0.65  # the top of 32 noise means, well above chance
    assert abs(np.mean(nested) - 0.5) <= 0.1, nested  # the honest estimate: chance
    assert np.mean(best) - np.mean(nested) >= 0.15


# ------------------------------------------------------------------ how many labels


def test_learning_curve_sizes_never_exceed_the_smallest_class_training_share():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [30, 12, 7])
    splitter = StratifiedKFold(3, shuffle=True, random_state=0)
    splits = list(splitter.split(np.zeros(len(y)), y))
    share = min(int(np.bincount(y[train]).min()) for train, _ in splits)
    reordered, cap = stratified_prefix_splits(y, splits)
    assert cap == share == 4
    assert per_class_sizes(cap) == [2, 4]
    for (train, test), (order, test2) in zip(splits, reordered):
        assert sorted(order) == sorted(train) and np.array_equal(test, test2)
        for k in range(1, cap + 1):  # every balanced prefix holds exactly k images of each class
            assert np.bincount(y[order[: 3 * k]], minlength=3).tolist() == [k, k, k]
    X = rng.normal(size=(len(y), 4)) + y[:, None]
    est = _classifiers()["logreg"][0]
    curve = learning_curve_of({"logreg": est}, X, y, splitter)
    assert curve["per_class"] == [2, 4] and max(curve["per_class"]) <= share
    assert len(curve["curves"]["logreg"]["mean"]) == 2 and curve["folds"] == 3


def test_per_class_sizes_follow_the_ladder_up_to_the_cap():
    assert per_class_sizes(1) == [] and per_class_sizes(2) == [2]
    assert per_class_sizes(32) == [2, 5, 10, 20, 32]
    assert per_class_sizes(LADDER[3]) == [2, 5, 10, 20]


def test_learning_curve_values_are_scikit_learns_on_the_stratified_prefixes():
    from sklearn.base import clone

    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 40)
    X = rng.normal(size=(80, 3)) + 0.8 * y[:, None]
    splitter = StratifiedKFold(4, shuffle=True, random_state=0)
    est = _classifiers()["logreg"][0]
    curve = learning_curve_of({"logreg": est}, X, y, splitter)
    assert curve["per_class"] == [2, 5, 10, 20, 30]
    splits, _ = stratified_prefix_splits(y, list(splitter.split(X, y)))
    for k, mean in zip(curve["per_class"], curve["curves"]["logreg"]["mean"]):
        scores = [clone(est).fit(X[tr[: 2 * k]], y[tr[: 2 * k]]).score(X[te], y[te]) for tr, te in splits]
        assert mean == pytest.approx(np.mean(scores))


def test_an_impossible_fit_is_none_not_a_crash():
    """7 neighbours cannot be found among 2 images per class x 2 classes."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 12)
    X = rng.normal(size=(24, 3)) + y[:, None]
    knn = _classifiers()["knn"][0].set_params(kneighborsclassifier__n_neighbors=7)
    curve = learning_curve_of({"knn": knn}, X, y, StratifiedKFold(3, shuffle=True, random_state=0))
    assert curve["per_class"][0] == 2 and curve["curves"]["knn"]["mean"][0] is None
    assert curve["curves"]["knn"]["mean"][-1] is not None


def _curve(means, other=None, std=0.02, folds=5):
    curves = {"logreg on stage5": {"mean": means, "std": [std] * len(means)}}
    if other is not None:
        curves["centroid"] = {"mean": other, "std": [std] * len(other)}
    return {"per_class": [2, 5, 10, 20][: len(means)], "n_classes": 3, "curves": curves, "folds": folds}


def test_curve_sentence_says_rising_only_when_the_last_step_beats_its_standard_error():
    rising = curve_sentence(_curve([0.5, 0.6, 0.7, 0.8]))
    assert rising.startswith("logreg on stage5 is still rising at 20 images per class (+0.100 from 10)")
    flat = curve_sentence(_curve([0.5, 0.7, 0.8, 0.805]))  # +0.005 < 0.02 / sqrt(5)
    assert "has levelled off at 20 images per class" in flat and "unlikely to help" in flat
    assert curve_sentence(_curve([0.5])) == ""


def test_curve_sentence_names_the_sizes_where_the_low_data_classifier_wins():
    text = curve_sentence(_curve([0.4, 0.6, 0.7, 0.8], other=[0.55, 0.65, 0.7, 0.75]))
    assert text.endswith("centroid beats it at 2, 5 images per class.")
    assert curve_sentence(_curve([0.6, 0.7], other=[0.5, 0.6])).endswith("centroid does not beat it at any size.")


# ------------------------------------------------------------------ what goes wrong


def test_error_analysis_against_counting_by_hand():
    names = ["cat", "dog", "fox"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 0, 1, 0, 1, 2, 1, 2])
    paths = [f"img{i}.jpg" for i in range(10)]
    e = error_analysis(y, pred, names, paths)
    assert e["confused_pairs"] == [
        {"true": "cat", "predicted": "dog", "count": 2, "share": 0.5},
        {"true": "dog", "predicted": "cat", "count": 1, "share": 1 / 3},
        {"true": "fox", "predicted": "dog", "count": 1, "share": 1 / 3},
    ]
    assert [m["path"] for m in e["misclassified"]] == ["img1.jpg", "img2.jpg", "img5.jpg", "img8.jpg"]
    assert e["misclassified"][0] == {"path": "img1.jpg", "true": "cat", "predicted": "dog"}
    # precision of dog: 2 right of 5 predicted; recall of cat: 2 of 4
    assert e["report"]["dog"]["precision"] == pytest.approx(2 / 5)
    assert e["report"]["cat"]["recall"] == pytest.approx(2 / 4)
    assert e["report"]["fox"]["support"] == 3
    text = format_errors(e, names)
    assert "most confused (true -> predicted): cat -> dog 2 (50%)" in text
    assert format_errors(error_analysis(y, y, names, paths), names).endswith("no image was misclassified")


def test_contact_sheet_draws_each_misclassified_image_with_its_caption(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(11):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(p)
        items.append({"path": str(p), "true": "cat", "predicted": "a very long class name indeed"})
    items.append({"path": str(tmp_path / "gone.jpg"), "true": "dog", "predicted": "cat"})  # moved since
    out = contact_sheet(items, tmp_path / "sheet" / "misclassified.png", total=40)
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG" and img.size == (8 * 112, 26 + 2 * (112 + 30))
        tile = np.asarray(img.convert("RGB"))[26 + 112 + 30 + 10:26 + 2 * 112 + 20, 3 * 112 + 10:3 * 112 + 100]
        assert (tile == 211).all()  # the 12th, unreadable, image: a light grey tile
    assert contact_sheet([], tmp_path / "none.png", total=40) is None and not (tmp_path / "none.png").exists()
    many = contact_sheet(items * 10, tmp_path / "many.png", total=200)
    with Image.open(many) as img:
        assert img.size[1] == 26 + (SHEET_MAX // 8 + 1) * (112 + 30)


# ------------------------------------------------------------------ negative transfer


def _row(features, mean, std, classifier="logreg", layer="stage5"):
    return SimpleNamespace(features=features, classifier=classifier, layer=layer, mean=mean, std=std)


@pytest.mark.parametrize("pretrained, raw, random_init, said", [
    ((0.90, 0.03), (0.70, 0.05), None, False),        # clearly better
    ((0.75, 0.05), (0.72, 0.04), None, True),         # within the spread of either
    ((0.75, 0.02), (0.625, 0.125), None, True),       # margin 0.125 = the larger spread: not more than it
    ((0.75, 0.02), (0.62, 0.125), None, False),       # margin just above it
    ((0.90, 0.03), (0.60, 0.05), (0.88, 0.04), True),  # random-init does as well
    ((0.90, 0.03), None, None, False),               # no baseline evaluated: nothing to say
])
def test_negative_transfer_note_appears_exactly_when_the_margin_is_within_the_spread(pretrained, raw, random_init, said):
    rows = [_row("pretrained", *pretrained), _row("pretrained", pretrained[0] - 0.1, 0.01, layer="stage4")]
    if raw:
        rows.append(_row("raw pixels", *raw, layer="16x16 RGB"))
    if random_init:
        rows.append(_row("random-init", *random_init))
    note = transfer_note(rows)
    assert bool(note) is said
    if said:
        assert note.startswith(f"The pretrained features (logreg on stage5: {pretrained[0]:.3f}")
        assert "another backbone family" in note and "fine-tuning" in note
        assert ("raw pixels" in note) is bool(raw and pretrained[0] - raw[0] <= max(pretrained[1], raw[1]))


def test_no_negative_transfer_note_about_a_random_init_backbone_itself():
    assert transfer_note([_row("random-init", 0.5, 0.1), _row("raw pixels", 0.6, 0.1)], main="random-init") == ""


# ------------------------------------------------------------------ end to end


def test_low_data_classifiers_are_candidates():
    assert set(LOW_DATA) <= set(CLASSIFIERS)
    grids = _classifiers()
    assert grids["centroid"][1] == {} and "kneighborsclassifier__n_neighbors" in grids["knn"][1]


def test_evaluate_folder_reports_curve_mistakes_and_writes_them(image_folder, tmp_path):
    res = evaluate_folder(image_folder, model="resnet18", weights=None, layers=["layer3", "pre_logits"],
                          classifiers=("logreg", "centroid"), cv=3, cache=None, precision="fp32", compare=True,
                          nested=False, log=lambda line: None)
    assert {r.classifier for r in res.rows} == {"logreg", "centroid"}
    lc = res.learning_curve
    assert lc["per_class"] == [2, 5] and len(lc["curves"]) == 2  # 8 images per class, 3 folds: 5 in training
    chosen = f"{res.best['classifier']} on {res.best['layer']}"
    assert list(lc["curves"])[0] == chosen and lc["sentence"].startswith(chosen)
    assert sum(res.report[c]["support"] for c in res.class_names) == res.n_images == 24
    wrong = sum(sum(row) - row[i] for i, row in enumerate(res.confusion))
    assert len(res.misclassified) == wrong
    assert res.transfer_note == ""  # weights=None: the backbone asked for is itself a baseline (random-init)
    text = format_report(res)
    assert "images per class" in text and format_learning_curve(res) in text and "precision" in text
    files = write_report(res, tmp_path / "report")
    names = {p.name for p in files}
    assert {"results.json", "learning_curve.png", "accuracy_by_layer.png", "confusion_matrix.png"} <= names
    assert ("misclassified.png" in names) is bool(wrong)
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["learning_curve"]["per_class"] == [2, 5] and data["transfer_note"] == res.transfer_note
    assert len(data["misclassified"]) == wrong and data["report"]["cat"]["support"] == 8
    for p in files:
        if p.suffix == ".png":
            with Image.open(p) as img:
                img.load()
    off = evaluate_folder(image_folder, model="resnet18", weights=None, layers=["pre_logits"], classifiers=("logreg",),
                          cv=3, cache=None, precision="fp32", nested=False, learning_curve=False, log=lambda line: None)
    assert off.learning_curve == {} and off.transfer_note == ""  # no baselines: nothing to compare with
