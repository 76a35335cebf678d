"""Corpus builder: deterministic document splits, deduplication, domain caps, missing-source errors."""

import argparse
import gzip
import json
from collections import Counter

import pytest

from expertmesh.training import corpus
from expertmesh.training.corpus import (MissingSourceError, build_corpus, normalised_hash, select_documents,
                                        split_of, truncate)


def test_split_is_deterministic_and_near_90_5_5():
    ids = [f"/usr/share/doc/file{i}.txt" for i in range(20_000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    counts = Counter(splits)
    assert abs(counts["train"] / len(ids) - 0.90) < 0.01
    assert abs(counts["validation"] / len(ids) - 0.05) < 0.01
    assert abs(counts["test"] / len(ids) - 0.05) < 0.01


def test_normalised_hash_ignores_whitespace_and_case_only():
    assert normalised_hash("def f():\n    return 1\n") == normalised_hash("DEF  f():  return 1")
    assert normalised_hash("return 1") != normalised_hash("return 2")


def test_truncate_cuts_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    cut = truncate(text, 50)
    assert len(cut) <= 50 and cut.endswith("\n") and text.startswith(cut)
    assert truncate("short\n", 50) == "short\n"


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_select_documents_dedups_and_caps(tmp_path):
    body = "x = 1\n" * 50
    paths = [_write(tmp_path / f"m{i}.py", body if i < 3 else body + f"y = {i}\n") for i in range(10)]
    seen: set[str] = set()
    docs = list(select_documents("python", paths, seen, max_bytes=10**9, max_doc_chars=10**6, min_doc_chars=10))
    assert len(docs) == 8  # the three identical files count once
    assert len({normalised_hash(d.text) for d in docs}) == 8
    capped = list(select_documents("python", paths, set(), max_bytes=700, max_doc_chars=10**6, min_doc_chars=10))
    assert len(capped) == 3  # stops at the first document that reaches the cap
    # documents already seen in another domain are not taken twice
    assert list(select_documents("python", paths, seen, 10**9, 10**6, 10)) == []


def test_missing_man_page_package_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "DPKG_INFO", tmp_path)
    with pytest.raises(MissingSourceError, match="apt-get install -y manpages-fr"):
        corpus.package_man_pages(("manpages-fr",))


def _roff_page(path, sentence):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        handle.write(f'.\\" comment that must not leak\n.TH T 1\n.SH NOM\nt \\- {sentence}\n.PP\n'
                     + f"{sentence} \\fBgras\\fP.\n" * 20)


def test_build_corpus_writes_jsonl_and_stats(tmp_path, monkeypatch):
    stdlib = tmp_path / "stdlib"
    _write(stdlib / "os.py", "import sys\n" * 40)
    for i in range(30):
        _write(stdlib / f"mod{i}.py", f"def f{i}(x):\n    return x + {i}\n" * 20)
    _write(stdlib / "site-packages" / "third.py", "third party\n" * 40)
    monkeypatch.setattr(corpus, "DPKG_INFO", tmp_path / "dpkg")
    pages = []
    for i in range(12):
        page = tmp_path / "man" / "fr" / "man1" / f"p{i}.1.gz"
        _roff_page(page, f"Cette page {i} est en français")
        pages.append(str(page))
    _write(tmp_path / "dpkg" / "manpages-fr.list", "\n".join(pages) + "\n")
    _write(tmp_path / "dpkg" / "manpages-fr-dev.list", "")
    args = argparse.Namespace(out=str(tmp_path / "out"), domains=["python", "french"], domain_mb=1.0,
                              max_doc_chars=40_000, min_doc_chars=100, python_stdlib=str(stdlib),
                              include="/nonexistent", man_root="/nonexistent", doc_root="/nonexistent")
    summary = build_corpus(args)
    records = [json.loads(line) for split in ("train", "validation", "test")
               for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in records} == {"python", "french"}
    assert not any("site-packages" in r["doc_id"] for r in records)
    french = [r["text"] for r in records if r["domain"] == "french"]
    assert french and all("comment" not in t and "\\f" not in t and "gras." in t for t in french)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == json.loads(json.dumps(summary))
    assert sum(stats["splits"][s]["python"]["documents"] for s in ("train", "validation", "test")) == 31
    assert sum(stats["totals"][s]["documents"] for s in stats["totals"]) == len(records)
